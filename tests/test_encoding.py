"Tests of the encoding stage: shards, meta.json and the loaders."
import json

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict, load_from_disk
from transformers import AutoTokenizer

from llm_lifecycle.core import StageRun, get_stage, stage_config, stage_done
from llm_lifecycle.encoding import (decode_shard, encode_split, eval_batches, get_batch, load_tokens, save_tokens,
                                    token_dtype, tokens_meta, write_tokens)
from llm_lifecycle.tokenizer import CHAT_TOKENS, SPECIAL_TOKENS, train_hf_bpe, wrap_tokenizer

DOCS = ["The first document, about tokens.", "A second one:\n    indented code()\n", "Third <|eos|> has the separator as text.",
        "Unicode too: café, 日本語, 🤗."]


@pytest.fixture(scope="module")
def tokenizer():
    return wrap_tokenizer(train_hf_bpe(DOCS * 4, 320, [*SPECIAL_TOKENS.values(), *CHAT_TOKENS], min_frequency=1))


def test_token_dtype():
    assert token_dtype(50_257) == np.uint16
    assert token_dtype(100_000) == np.uint32
    with pytest.raises(ValueError, match="positive"): token_dtype(-3)


def test_encode_split_and_decode(tokenizer):
    ds = Dataset.from_dict({"text": DOCS, "id": list(range(len(DOCS)))})
    ids, lens, n_bytes = encode_split(ds, tokenizer)
    assert ids.dtype == np.uint16 and len(ids) == lens.sum()
    assert n_bytes == sum(len(d.encode()) for d in DOCS)
    assert int((ids == tokenizer.eos_token_id).sum()) == len(DOCS)  # the literal "<|eos|>" stays text
    assert decode_shard(ids, tokenizer) == DOCS
    with pytest.raises(ValueError, match="no 'text' column"): encode_split(ds.remove_columns("text"), tokenizer)


def test_encode_split_num_proc(tokenizer):
    ds = Dataset.from_dict({"text": DOCS * 10})
    assert np.array_equal(encode_split(ds, tokenizer, num_proc=2, batch_size=4)[0], encode_split(ds, tokenizer)[0])


def test_write_load_tokens(tokenizer, tmp_path):
    ids = np.arange(100, dtype=np.uint16)
    write_tokens(ids, tmp_path/"train.bin")
    (tmp_path/"meta.json").write_text(json.dumps(tokens_meta(tokenizer, {"train": dict(docs=1, tokens=100, bytes=300)})))
    data = load_tokens(tmp_path, "train")
    assert np.array_equal(data, ids)
    with pytest.raises(KeyError, match="no split"): load_tokens(tmp_path, "test")
    write_tokens(ids[:50], tmp_path/"train.bin")
    with pytest.raises(ValueError, match="meta.json says 100"): load_tokens(tmp_path, "train")


def test_save_tokens(tokenizer, tmp_path):
    "One function writes the whole stage: shards and meta.json replace any older tokens/, metrics.json comes last."
    run = StageRun(get_stage("encoding"), "tiny", tmp_path, torch.device("cpu"), 0, stage_config("encoding", "tiny"))
    (tmp_path/"tokens").mkdir()
    (tmp_path/"tokens"/"old.bin").write_bytes(b"stale")
    corpus = DatasetDict(train=Dataset.from_dict({"text": DOCS * 3}), validation=Dataset.from_dict({"text": DOCS[:2]}))
    results = save_tokens(run, tokenizer, corpus)["results"]
    assert sorted(p.name for p in (tmp_path/"tokens").iterdir()) == ["meta.json", "metrics.json", "train.bin", "validation.bin"]
    assert stage_done(tmp_path, "encoding")
    for split, ds in corpus.items():
        ids = load_tokens(tmp_path/"tokens", split)
        assert decode_shard(np.asarray(ids), tokenizer) == ds["text"]
        assert results[f"{split}_tokens"] == len(ids)
        assert results[f"{split}_bytes_per_token"] == pytest.approx(sum(len(t.encode()) for t in ds["text"]) / len(ids))


def test_get_batch():
    data = np.arange(1000, dtype=np.uint16)
    x, y = get_batch(data, 4, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(y, x + 1)
    x2, _ = get_batch(data, 4, 16, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)
    with pytest.raises(ValueError, match="too few"): get_batch(data[:16], 1, 16)


def test_get_batch_shards_make_the_global_batch():
    data = np.arange(5000, dtype=np.uint16)
    whole, _ = get_batch(data, 12, 8, torch.Generator().manual_seed(3))
    shards = [get_batch(data, 4, 8, torch.Generator().manual_seed(3), shard=r, num_shards=3)[0] for r in range(3)]
    assert torch.equal(torch.cat(shards), whole)
    with pytest.raises(ValueError, match="shard must be"): get_batch(data, 4, 8, shard=3, num_shards=3)


def test_eval_batches_cover_in_order():
    data = np.arange(103, dtype=np.uint16)
    batches = list(eval_batches(data, 3, 10))
    assert [len(x) for x, _ in batches] == [3, 3, 3, 1]
    xs = torch.cat([x for x, _ in batches]).flatten()
    assert torch.equal(xs, torch.arange(100))
    assert torch.equal(torch.cat([y for _, y in batches]).flatten(), torch.arange(1, 101))
    assert len(list(eval_batches(data, 3, 10, max_batches=2))) == 2
    with pytest.raises(ValueError, match="too few"): next(eval_batches(data[:5], 1, 10))


def test_tiny_shards(tiny_run):
    meta = json.loads((tiny_run/"tokens"/"meta.json").read_text())
    tok = AutoTokenizer.from_pretrained(tiny_run/"tokenizer")
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == len(tok) and meta["eos_id"] == tok.eos_token_id
    corpus = load_from_disk(tiny_run/"data")
    for split, c in meta["splits"].items():
        path = tiny_run/"tokens"/f"{split}.bin"
        assert path.stat().st_size == c["tokens"] * np.dtype(meta["dtype"]).itemsize
        assert c["docs"] == len(corpus[split])
        assert c["bytes"] == sum(len(t.encode("utf-8")) for t in corpus[split]["text"])
        assert c["bytes_per_token"] == pytest.approx(c["bytes"] / c["tokens"])
    assert meta["bytes_per_token"] == meta["splits"]["validation"]["bytes_per_token"]
    val = load_tokens(tiny_run/"tokens", "validation")
    assert decode_shard(np.asarray(val), tok) == list(corpus["validation"]["text"])
    assert int(np.asarray(load_tokens(tiny_run/"tokens", "train")).max()) < meta["vocab_size"]
    results = json.loads((tiny_run/"tokens"/"metrics.json").read_text())["results"]
    for split in corpus:
        tokens = (tiny_run/"tokens"/f"{split}.bin").stat().st_size // np.dtype(meta["dtype"]).itemsize
        assert results[f"{split}_tokens"] == tokens > 10_000
        n_bytes = sum(len(t.encode("utf-8")) for t in corpus[split]["text"])
        assert results[f"{split}_bytes_per_token"] == pytest.approx(n_bytes / tokens)
        assert 2.5 < results[f"{split}_bytes_per_token"] < 4.8
