"Stage 01: the corpus the tiny run made, the pipeline on planted duplicates, and bad input."
import json

import nbformat
import numpy as np
import pytest
from datasets import Dataset, load_from_disk

from llm_lifecycle.data import (PII_PATTERNS, clean_corpus, collect, exact_key, folder_docs, is_permissive, perturb,
                                split_corpus)

WORDS = ("parser token model corpus buffer stream index cache schema record module socket thread signal queue "
         "encoder decoder vector tensor kernel header payload archive codec matrix").split()
ADJ = "fast small stable lazy strict simple robust careful".split()


def english_doc(rng, n=10):
    "A document of template sentences with random words: passes the quality filters, unlike any other."
    w = lambda: f"{rng.choice(WORDS)}{rng.integers(1000)}"
    return " ".join(f"The {w()} of the {w()} is {rng.choice(ADJ)} and it has to be checked with the {w()}."
                    for _ in range(n))


@pytest.fixture(scope="module")
def data_dir(tiny_run): return tiny_run/"data"


def test_funnel_is_monotone_and_complete(data_dir):
    stats = json.loads((data_dir/"stats.json").read_text())
    steps = [s["step"] for s in stats["funnel"]]
    assert steps == ["raw", "normalise", "strip markup", "licence", "quality", "redact PII", "exact dedup", "near dedup"]
    docs = [s["docs"] for s in stats["funnel"]]
    assert all(a >= b for a, b in zip(docs, docs[1:])) and docs[-1] > 300
    assert stats["funnel"][0]["bytes"] > 3_000_000  # the raw default is a few MB
    assert stats["funnel"][3]["examples"], "the licence filter removed nothing to show"
    assert sum(v["docs"] for v in stats["splits"].values()) == docs[-1]


def test_near_dedup_measured_on_planted_copies(data_dir):
    ev = json.loads((data_dir/"stats.json").read_text())["near_dedup_eval"]
    assert ev["planted"] == 100 and ev["recall"] >= 0.9 and ev["precision"] >= 0.9


def test_splits_disjoint_clean_and_permissive(data_dir):
    dd = load_from_disk(str(data_dir))
    assert set(dd) == {"train", "validation", "test"} and all(len(d) for d in dd.values())
    ids = {s: set(dd[s]["id"]) for s in dd}
    keys = {s: {exact_key(t) for t in dd[s]["text"]} for s in dd}
    for a, b in [("train", "validation"), ("train", "test"), ("validation", "test")]:
        assert not ids[a] & ids[b] and not keys[a] & keys[b]
    for s in dd:
        for row in dd[s]:
            assert is_permissive(row["licence"]), row["id"]
            assert not PII_PATTERNS["EMAIL"].search(row["text"]), row["id"]
            assert row["text"] == row["text"].strip() and "\r" not in row["text"]


def test_executed_notebook_has_the_funnel_figure(tiny_run):
    nb = nbformat.read(tiny_run/"notebooks/01_data.ipynb", as_version=4)
    pngs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(pngs) >= 2  # the LSH S-curve and the funnel


def test_collection_is_deterministic():
    a = collect(["pydoc", "metadata"], max_docs=50)
    b = collect(["pydoc", "metadata"], max_docs=50)
    assert [d["id"] for d in a] == [d["id"] for d in b] and [d["text"] for d in a] == [d["text"] for d in b]


def test_planted_duplicates_are_removed():
    rng = np.random.default_rng(0)
    originals = [english_doc(rng) for _ in range(40)]
    exact = [originals[i].upper().replace(" ", "  ") for i in range(5)]  # same text up to case and spacing
    near = [perturb(originals[i], 0.01, rng) for i in range(5, 15)]
    texts = originals + exact + near
    ds = Dataset.from_list([dict(id=f"d{i}", text=t, source="test", licence="MIT", format="text") for i, t in enumerate(texts)])
    clean, funnel, info = clean_corpus(ds, jaccard=0.7)
    assert sorted(clean["id"]) == sorted(f"d{i}" for i in range(40))
    by_step = {s["step"]: s["docs"] for s in funnel.steps}
    assert by_step["exact dedup"] == 50 and by_step["near dedup"] == 40


def test_splits_are_deterministic_and_disjoint():
    ds = Dataset.from_list([dict(id=f"doc{i}", text=f"text {i}") for i in range(400)])
    a, b = split_corpus(ds, 0.1, 0.1), split_corpus(ds, 0.1, 0.1)
    assert all(a[s]["id"] == b[s]["id"] for s in a)
    assert sum(len(a[s]) for s in a) == 400
    with pytest.raises(ValueError, match="empty"): split_corpus(ds.select(range(3)), 0.01, 0.01)


@pytest.mark.parametrize("name,content,message", [
    ("latin1.txt", "line one\ncafé\n".encode("latin-1"), r"latin1.txt:2: not UTF-8 text: byte 0xe9"),
    ("blob.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00", r"blob.txt: binary file"),
    ("empty.md", b"\n\n", r"empty.md: the file is empty"),
    ("bad.jsonl", b'{"text": "ok"}\n{"text": }\n', r"bad.jsonl:2: not valid JSON"),
    ("notext.jsonl", b'{"text": "ok"}\n{"body": "x"}\n', r"notext.jsonl:2: record has no string 'text' field"),
])
def test_bad_input_names_file_and_line(tmp_path, name, content, message):
    (tmp_path/"good.txt").write_text("A perfectly fine document.")
    (tmp_path/name).write_bytes(content)
    with pytest.raises(ValueError, match=message): list(folder_docs(tmp_path))


def test_corpus_that_filters_to_nothing(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(3): (tmp_path/f"doc{i}.txt").write_text(english_doc(rng))  # no LICENSE file: licence unknown
    ds = Dataset.from_list(collect([], path=tmp_path))
    with pytest.raises(ValueError, match="nothing at step 'licence'.*LICENSE file"): clean_corpus(ds)
    (tmp_path/"LICENSE").write_text("Permission is hereby granted, free of charge, to any person obtaining a copy")
    ds = Dataset.from_list(collect([], path=tmp_path))
    clean, _, _ = clean_corpus(ds)
    assert len(clean) == 3
    with pytest.raises(ValueError, match="nothing at step 'quality'"): clean_corpus(ds, min_words=10_000)


def test_folder_of_records(tmp_path):
    (tmp_path/"a.jsonl").write_text('{"text": "one", "license": "Apache-2.0"}\n\n{"text": "two"}\n')
    (tmp_path/"b.json").write_text(json.dumps({"data": [{"text": "three", "licence": "GPL-3.0"}]}))
    docs = list(folder_docs(tmp_path))
    assert [(d["id"], d["text"], d["licence"]) for d in docs] == [
        ("local/a.jsonl#1", "one", "Apache-2.0"), ("local/a.jsonl#3", "two", "UNKNOWN"), ("local/b.json#1", "three", "GPL-3.0")]


def test_sample_is_independent_of_the_split(tmp_path):
    "`max_docs` samples by a salted hash: a 10 % sample still splits about 90/5/5 (the split hashes the bare id)."
    from collections import Counter
    from llm_lifecycle.data import assign_split, collect
    for i in range(400): (tmp_path/f"doc{i}.txt").write_text(f"Document number {i} says something. " * 5)
    docs = collect(sources=(), path=tmp_path, max_docs=40)
    assert len(docs) == 40
    counts = Counter(assign_split(d["id"]) for d in docs)
    assert counts["train"] >= 28, counts  # sampled by the split's own hash, all 40 would be test or validation


def test_docstrings_parsed_in_parallel_are_the_same():
    import sysconfig
    from pathlib import Path
    from llm_lifecycle.data import docstring_docs
    root = Path(sysconfig.get_paths()["stdlib"])/"email"
    serial = list(docstring_docs(root))
    assert len(serial) > 10 and all(d["id"].startswith("docstrings/") and d["licence"] for d in serial)
    assert list(docstring_docs(root, num_proc=2)) == serial
