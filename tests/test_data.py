"Stage 01: the corpus the tiny run made, the pipeline on planted duplicates, and bad input."
import json, re, shutil, subprocess

import nbformat
import numpy as np
import pytest
from datasets import Dataset, load_from_disk

from llm_lifecycle.data import (PII_PATTERNS, BadFolder, assign_split, clean_corpus, collect, exact_key, fill_empty_splits,
                                folder_docs, is_permissive, perturb, split_corpus, stable_hash)

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
    assert stats["funnel"][0]["bytes"] > 2_000_000  # the raw default is a few MB (3.1 of the standard library's text on tiny)
    # the licence step shows what it removed, if anything: on tiny's standard-library corpus (all PSF) nothing;
    # test_the_user_says_the_licence checks the filter itself
    assert bool(stats["funnel"][3]["examples"]) == (docs[2] > docs[3])
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
    svgs = [o["data"]["image/svg+xml"] for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if "image/svg+xml" in o.get("data", {})]
    assert len(svgs) >= 2  # the LSH S-curve and the funnel, as SVG line and bar plots
    assert all(len(s.encode()) < 60_000 for s in svgs), [len(s) for s in svgs]  # web size


def test_collection_is_deterministic():
    a, _ = collect(["pydoc", "metadata"], max_docs=50)
    b, _ = collect(["pydoc", "metadata"], max_docs=50)
    assert [d["id"] for d in a] == [d["id"] for d in b] and [d["text"] for d in a] == [d["text"] for d in b]


def test_the_corpus_leaves_out_this_projects_own_readme():
    "The project's description is its README: in the corpus, every edit of the docs would change every model downstream."
    import importlib.metadata
    from llm_lifecycle.data import licence_file_docs, metadata_docs, site_licences
    assert importlib.metadata.distribution("llm-lifecycle").metadata.get_payload().strip()  # installed, with a description
    ids = [d["id"] for d in metadata_docs()]
    assert len(ids) > 50 and "metadata/llm-lifecycle" not in ids and "metadata/torch" in ids
    assert not any("llm_lifecycle" in d["id"] for d in licence_file_docs())
    assert not any("llm_lifecycle" in k for k in site_licences())  # nor its modules (or editable-install finder) in site_docstrings


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
    assert all(a[s]["id"] == [i for i in ds["id"] if assign_split(i, 0.1, 0.1) == s] for s in a)  # no split empty: the hash alone


def test_small_corpus_gets_a_document_in_every_split():
    "An empty split takes the largest split's document nearest its hash range; fewer than 3 documents is an error."
    ids = [f"local/doc{i:02d}.txt" for i in range(25)]
    assert "test" not in {assign_split(i) for i in ids}  # these 25 ids hash to train and validation only
    dd = split_corpus(Dataset.from_list([dict(id=i) for i in ids]))
    lowest_train = min((i for i in ids if assign_split(i) == "train"), key=stable_hash)
    assert dd["test"]["id"] == [lowest_train] and len(dd["train"]) + len(dd["validation"]) == 24
    assert dd["test"]["id"] == split_corpus(Dataset.from_list([dict(id=i) for i in reversed(ids)]))["test"]["id"]
    assert fill_empty_splits(["train"] * 3, [30, 10, 20]) == ["train", "test", "validation"]
    assert set(fill_empty_splits(["test"] * 3, [3, 1, 2])) == {"train", "validation", "test"}
    with pytest.raises(ValueError, match="give at least 3 documents"): split_corpus(Dataset.from_list([dict(id="a"), dict(id="b")]))


BAD_FILES = [
    ("latin1.txt", "line one\ncafé\n".encode("latin-1"), r"latin1.txt:2: not UTF-8 text: byte 0xe9"),
    ("blob.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00", r"blob.txt: binary file"),
    ("empty.md", b"\n\n", r"empty.md: the file is empty"),
    ("bad.jsonl", b'{"text": "ok"}\n{"text": }\n', r"bad.jsonl:2: not valid JSON"),
    ("notext.jsonl", b'{"text": "ok"}\n{"body": "x"}\n', r"notext.jsonl:2: record has no string 'text' field"),
    ("broken.json", b'[{"text": "ok"},\n {"text": ]', r"broken.json:2: not valid JSON"),
]


@pytest.mark.parametrize("name,content,message", BAD_FILES)
def test_bad_input_names_file_and_line(tmp_path, name, content, message):
    (tmp_path/"good.txt").write_text("A perfectly fine document.")
    (tmp_path/name).write_bytes(content)
    with pytest.raises(BadFolder, match=message): folder_docs(tmp_path, on_bad_file="error")
    docs, bad = folder_docs(tmp_path)  # skip: the good file, and a jsonl file's good record, stay
    assert "local/good.txt" in [d["id"] for d in docs] and len(bad) == 1 and bad[0].file == str(tmp_path/name)
    assert len(docs) == (2 if name.endswith(".jsonl") else 1)


def test_on_bad_file_error_lists_every_problem_at_once(tmp_path):
    (tmp_path/"good.txt").write_text("A perfectly fine document.")
    for name, content, _ in BAD_FILES: (tmp_path/name).write_bytes(content)
    with pytest.raises(BadFolder) as e: collect([], path=tmp_path, licence="MIT", on_bad_file="error")
    assert len(e.value.problems) == len(BAD_FILES) and str(e.value).startswith(f"4 bad files and 2 bad records in {tmp_path}")
    for _, _, message in BAD_FILES: assert re.search(message, str(e.value)), message
    docs, skipped = collect([], path=tmp_path, licence="MIT")
    assert [(b.line, b.whole_file) for b in skipped] == [(2, False), (None, True), (2, True), (None, True), (2, True), (2, False)]
    assert sorted(d["id"] for d in docs) == ["local/bad.jsonl#1", "local/good.txt", "local/notext.jsonl#1"]
    with pytest.raises(ValueError, match="on_bad_file='ignore': use 'skip' or 'error'"): folder_docs(tmp_path, on_bad_file="ignore")


def test_corpus_that_filters_to_nothing(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(3): (tmp_path/f"doc{i}.txt").write_text(english_doc(rng))  # no LICENSE file: licence unknown
    ds = Dataset.from_list(collect([], path=tmp_path)[0])
    with pytest.raises(ValueError, match="nothing at step 'licence'.*licence='MIT'.*LICENSE file"): clean_corpus(ds)
    (tmp_path/"LICENSE").write_text("Permission is hereby granted, free of charge, to any person obtaining a copy")
    ds = Dataset.from_list(collect([], path=tmp_path)[0])
    clean, _, _ = clean_corpus(ds)
    assert len(clean) == 3
    with pytest.raises(ValueError, match="nothing at step 'quality'"): clean_corpus(ds, min_words=10_000)


def test_the_user_says_the_licence(tmp_path):
    "`licence` applies to the folder's documents (a record's own field wins); a licence the stage would not keep is an error."
    rng = np.random.default_rng(2)
    for i in range(3): (tmp_path/f"doc{i}.txt").write_text(english_doc(rng))  # no LICENSE file
    (tmp_path/"r.jsonl").write_text(json.dumps(dict(text=english_doc(rng), licence="GPL-3.0")) + "\n")
    for lic in ("MIT", "own", "CC0-1.0 OR GPL-3.0"):
        docs, _ = collect([], path=tmp_path, licence=lic)
        assert [d["licence"] for d in docs] == [lic] * 3 + ["GPL-3.0"]
        clean, _, _ = clean_corpus(Dataset.from_list(docs))
        assert sorted(clean["id"]) == [f"local/doc{i}.txt" for i in range(3)]
    for bad in ("GPL-3.0", "MTI", "UNKNOWN"):
        with pytest.raises(ValueError, match=f"licence='{bad}' is not a licence this stage keeps"): collect([], path=tmp_path, licence=bad)
    with pytest.raises(ValueError, match="licence='MIT' is for the documents of path or hf_dataset"): collect(["pydoc"], licence="MIT")
    builtin, _ = collect(["pydoc", "metadata"], max_docs=None)  # built-in sources: licences as their packages declare them
    assert "own" not in {d["licence"] for d in builtin}


def test_folder_of_records(tmp_path):
    (tmp_path/"a.jsonl").write_text('{"text": "one", "license": "Apache-2.0"}\n\n{"text": "two"}\n')
    (tmp_path/"b.json").write_text(json.dumps({"data": [{"text": "three", "licence": "GPL-3.0"}]}))
    docs, bad = folder_docs(tmp_path)
    assert not bad and [(d["id"], d["text"], d["licence"]) for d in docs] == [
        ("local/a.jsonl#1", "one", "Apache-2.0"), ("local/a.jsonl#3", "two", "UNKNOWN"), ("local/b.json#1", "three", "GPL-3.0")]


def test_sample_is_independent_of_the_split(tmp_path):
    "`max_docs` samples by a salted hash: a 10 % sample still splits about 90/5/5 (the split hashes the bare id)."
    from collections import Counter
    from llm_lifecycle.data import assign_split, collect
    for i in range(400): (tmp_path/f"doc{i}.txt").write_text(f"Document number {i} says something. " * 5)
    docs, _ = collect(sources=(), path=tmp_path, max_docs=40)
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


def own_folder(root, n_docs:int=25, seed:int=3):
    "A user's folder: `n_docs` good documents (txt, md, and 3 lines of a jsonl) beside an empty, a binary and a Latin-1 file and a broken JSON line; no LICENSE."
    rng = np.random.default_rng(seed)
    for i in range(n_docs - 3): (root/f"doc{i:02d}.{'md' if i % 4 == 0 else 'txt'}").write_text(english_doc(rng))
    lines = [json.dumps(dict(text=english_doc(rng))) for _ in range(3)]
    lines.insert(2, '{"text": "a record cut in half')
    (root/"records.jsonl").write_text("\n".join(lines) + "\n")
    (root/"empty.txt").write_bytes(b"")
    (root/"image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (root/"notes-latin1.txt").write_bytes(("Notes on the café and its menu, written long ago. " * 10).encode("latin-1"))


def test_own_folder_with_bad_files_through_the_cli(tmp_path):
    "Issue 8: a folder with bad files, no LICENSE and 25 documents goes through stage 01, and every skipped file is reported."
    src, run_dir = tmp_path/"my-texts", tmp_path/"run"
    src.mkdir(); own_folder(src)
    r = subprocess.run([shutil.which("llm-lifecycle"), "run", "--preset", "tiny", "--run-dir", str(run_dir), "--to", "01",
                        "--no-progress", "-p", "sources=[]", "-p", f"path={src}", "-p", "licence=MIT"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    stats = json.loads((run_dir/"data/stats.json").read_text())
    assert [(b["file"], b["line"], b["whole_file"]) for b in stats["skipped"]] == [
        (str(src/"empty.txt"), None, True), (str(src/"image.txt"), None, True), (str(src/"notes-latin1.txt"), 1, True),
        (str(src/"records.jsonl"), 3, False)]
    assert [b["reason"].split(":")[0] for b in stats["skipped"]] == [
        "the file is empty", "binary file (NUL bytes), not text", "not UTF-8 text", "not valid JSON"]
    assert stats["funnel"][0]["docs"] == stats["funnel"][-1]["docs"] == 25  # every good document survives, MIT included
    sizes = {s: v["docs"] for s, v in stats["splits"].items()}
    assert sum(sizes.values()) == 25 and min(sizes.values()) >= 1, sizes
    metrics = json.loads((run_dir/"data/metrics.json").read_text())
    assert metrics["results"]["skipped_files"] == 3 and metrics["results"]["skipped_records"] == 1
    assert len(metrics["warnings"]) == 1 + bool(stats["split_moves"])  # and one for a split the small-corpus rule filled
    warning = metrics["warnings"][0]
    assert warning.startswith("skipped 3 bad files and 1 bad record: empty.txt (the file is empty); image.txt") and "stats.json" in warning
    assert f"warning: {warning}" in r.stdout  # the runner prints the stage's warnings
