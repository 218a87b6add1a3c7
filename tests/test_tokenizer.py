"Tests of the tokenizer stage: the from-scratch BPE, the production tokenizer and its artifacts."
import json

import pytest
import torch
from datasets import load_from_disk
from hypothesis import HealthCheck, given, settings, strategies as st
from transformers import AutoTokenizer

from llm_lifecycle.core import StageRun, get_stage, stage_config, stage_done
from llm_lifecycle.tokenizer import (CHAT_TOKENS, SPECIAL_TOKENS, BPETokenizer, hf_token_bytes, load_bpe, merge_pair,
                                     pretokenize, sample_texts, save_bpe, save_tokenizer, split_special, train_bpe,
                                     train_bpe_naive, train_hf_bpe, train_sentencepiece, wrap_tokenizer)

CORPUS = ["The tokenizer maps text to ids and back again. " * 3,
          "def merge_pair(ids, pair, new_id):\n    return [new_id if p == pair else p for p in ids]\n",
          "Byte-level BPE never needs an unknown token: café, naïve, 日本語 and 🤗 are bytes too.",
          "Numbers like 12345 and 3.14159 are split into runs of at most three digits."]
SETTINGS = settings(max_examples=50, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer(train_bpe(CORPUS, 256 + 60), special_tokens=["<|eos|>", "<|end|>"])


def test_pretokenize_covers_text():
    s = "Hello, world!  It's 2024.\n\n\tdef f(): pass"
    assert "".join(pretokenize(s)) == s
    assert pretokenize("123456") == ["123", "456"]


def test_merge_pair_left_to_right():
    assert merge_pair([5, 5, 5, 5, 5], (5, 5), 300) == [300, 300, 5]
    assert merge_pair([1, 2], (2, 1), 300) == [1, 2]


@SETTINGS
@given(st.lists(st.text(alphabet="ab c\n.", max_size=60), min_size=1, max_size=8), st.integers(256, 300))
def test_fast_trainer_matches_naive(texts, vocab_size):
    "The incremental trainer learns exactly the naive trainer's merges, ties included (a tiny alphabet makes many)."
    if not "".join(texts): return
    assert train_bpe(texts, vocab_size) == train_bpe_naive(texts, vocab_size)


def test_fast_trainer_matches_naive_with_specials_and_min_frequency():
    texts = CORPUS + ["<|eos|>".join(CORPUS)]
    kw = dict(special_tokens=["<|eos|>"], min_frequency=3)
    merges = train_bpe(texts, 400, **kw)
    assert merges == train_bpe_naive(texts, 400, **kw)
    assert len(merges) < 400 - 256 - 1  # min_frequency stopped it early
    assert not any(b"<|eos|>" in t for t in BPETokenizer(merges).vocab)


def test_merges_deterministic():
    assert train_bpe(CORPUS, 320) == train_bpe(list(CORPUS), 320)


@SETTINGS
@given(st.permutations(CORPUS + ["aaaa bbbb aaaa", "ab ab ba"]))
def test_merges_do_not_depend_on_document_order(texts):
    "Ties are broken by the smaller pair, so the merges are the same whatever the order of the documents."
    assert train_bpe(texts, 330) == train_bpe(CORPUS + ["aaaa bbbb aaaa", "ab ab ba"], 330)


@SETTINGS
@given(st.text())
def test_roundtrip_any_unicode(bpe, s):
    assert bpe.decode(bpe.encode(s)) == s


@SETTINGS
@given(st.text(), st.text(), st.sampled_from(["<|eos|>", "<|end|>"]))
def test_special_tokens_never_split(bpe, a, b, special):
    ids = bpe.encode(a + special + b)
    n_special = (a + special + b).count(special)
    assert ids.count(bpe.special_tokens[special]) == n_special
    assert bpe.decode(ids) == a + special + b


def test_bad_input_errors(bpe):
    with pytest.raises(ValueError, match="no training text"): train_bpe("", 300)
    with pytest.raises(ValueError, match="no training text"): train_bpe_naive([], 300)
    with pytest.raises(ValueError, match="at least 256"): train_bpe("abc", 255)
    with pytest.raises(ValueError, match="at least 256"): train_bpe("abc", 257, special_tokens=["<|a|>", "<|b|>"])
    with pytest.raises(ValueError, match="outside the vocabulary"): bpe.decode([bpe.vocab_size])
    with pytest.raises(ValueError, match="outside the vocabulary"): bpe.decode([-1])
    with pytest.raises(TypeError, match="takes a str"): bpe.encode(None)
    with pytest.raises(ValueError, match="no earlier token"): BPETokenizer([(256, 1)])


def test_save_load(bpe, tmp_path):
    save_bpe(bpe, tmp_path/"bpe.json")
    again = load_bpe(tmp_path/"bpe.json")
    s = "tokenizer<|end|> ids 🤗"
    assert again.encode(s) == bpe.encode(s)
    assert again.special_tokens == bpe.special_tokens
    (tmp_path/"other.json").write_text(json.dumps({"type": "wordpiece"}))
    with pytest.raises(ValueError, match="not a byte-level BPE"): load_bpe(tmp_path/"other.json")


def test_split_special_and_sample():
    assert split_special("<|a|><|ab|>x", ["<|a|>", "<|ab|>"]) == ["<|a|>", "<|ab|>", "x"]
    assert sum(len(t.encode()) for t in sample_texts(CORPUS, 100)) == 100
    assert sample_texts(CORPUS, 100, seed=1) == sample_texts(CORPUS, 100, seed=1)


def test_scratch_and_tokenizers_agree():
    "Same algorithm, same data, same size: `tokenizers` learns nearly the same vocabulary as ours."
    ours = set(BPETokenizer(train_bpe(CORPUS * 3, 300, min_frequency=2)).vocab)
    theirs = train_hf_bpe(CORPUS * 3, 300, min_frequency=2)
    shared = hf_token_bytes(theirs) & ours
    assert len(shared) - 256 >= 0.8 * (len(ours) - 256)


def test_wrap_tokenizer_and_chat_mask():
    tok = wrap_tokenizer(train_hf_bpe(CORPUS, 320, [*SPECIAL_TOKENS.values(), *CHAT_TOKENS], min_frequency=1))
    chat = [{"role": "user", "content": "Why bytes?"}, {"role": "assistant", "content": "No unknown token."}]
    enc = tok.apply_chat_template(chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    answer = [i for i, m in zip(enc["input_ids"], enc["assistant_masks"]) if m]
    assert tok.decode(answer) == "No unknown token.<|end|>"
    with pytest.raises(ValueError, match="no token"): wrap_tokenizer(train_hf_bpe(CORPUS, 300))
    with pytest.raises(ValueError, match="smaller than 256"): train_hf_bpe(CORPUS, 260, [*SPECIAL_TOKENS.values(), *CHAT_TOKENS])


def test_sentencepiece_byte_fallback():
    sp = train_sentencepiece(CORPUS * 5, 400, "bpe")
    s = "unseen: привет 🤗\n  two spaces"
    assert sp.decode(sp.encode(s)) == s
    assert sp.unk_id() not in sp.encode(s)


def test_save_tokenizer(tmp_path):
    "One function writes the whole stage: the HF folder with stats.json replaces any older one, metrics.json comes last."
    run = StageRun(get_stage("tokenizer"), "tiny", tmp_path, torch.device("cpu"), 0, stage_config("tokenizer", "tiny"))
    (tmp_path/"tokenizer").mkdir()
    (tmp_path/"tokenizer"/"stale.txt").write_text("from an older run")
    tok = wrap_tokenizer(train_hf_bpe(CORPUS, 320, [*SPECIAL_TOKENS.values(), *CHAT_TOKENS], min_frequency=1))
    metrics = save_tokenizer(run, tok, {"bytes_per_token_validation": 2.5}, {"curve": {512: 2.0}})
    assert metrics["results"] == {"vocab_size": len(tok), "bytes_per_token_validation": 2.5}
    assert json.loads((tmp_path/"tokenizer"/"metrics.json").read_text())["results"] == metrics["results"]
    assert json.loads((tmp_path/"tokenizer"/"stats.json").read_text()) == {"curve": {"512": 2.0}}
    assert not (tmp_path/"tokenizer"/"stale.txt").exists() and stage_done(tmp_path, "tokenizer")
    assert AutoTokenizer.from_pretrained(tmp_path/"tokenizer")("tokens 🤗")["input_ids"] == tok("tokens 🤗")["input_ids"]


def test_tokenizer_artifacts(tiny_run):
    tok = AutoTokenizer.from_pretrained(tiny_run/"tokenizer")
    results = json.loads((tiny_run/"tokenizer"/"metrics.json").read_text())["results"]
    stats = json.loads((tiny_run/"tokenizer"/"stats.json").read_text())
    assert results["vocab_size"] == len(tok) == stage_config("tokenizer", "tiny")["vocab_size"]
    assert tok.convert_tokens_to_ids([*SPECIAL_TOKENS.values(), *CHAT_TOKENS]) == list(range(7))
    val = [t for t in load_from_disk(tiny_run/"data")["validation"]["text"] if t]
    n_tokens = sum(len(ids) for ids in tok(val, add_special_tokens=False)["input_ids"])
    assert results["bytes_per_token_validation"] == pytest.approx(sum(len(t.encode()) for t in val) / n_tokens)
    assert 2.5 < results["bytes_per_token_validation"] < stats["bytes_per_token_ceiling"]
    assert abs(results["scratch_vs_tokenizers_bytes_per_token_ratio"] - 1) < 0.03
    assert 0.7 < results["sentencepiece_unigram_vs_tokenizers_bytes_per_token_ratio"] < 1.1
    assert 0.7 < results["sentencepiece_bpe_vs_tokenizers_bytes_per_token_ratio"] < 1.1
    curve = [v for _, v in sorted((int(k), v) for k, v in stats["compression_vs_vocab_size"].items())]
    assert curve == sorted(curve) and len(curve) >= 4
    assert {r["tokenizer"] for r in stats["comparison"]} >= {"from scratch (ours)", "tokenizers BPE",
                                                             "SentencePiece bpe", "SentencePiece unigram"}
    s = "def f(x):\n    return x  # 🤗 日本語"
    assert tok.decode(tok(s)["input_ids"]) == s


def test_tiny_chat_template_mask(tiny_run):
    tok = AutoTokenizer.from_pretrained(tiny_run/"tokenizer")
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a token?"},
            {"role": "assistant", "content": "A piece of text."}, {"role": "user", "content": "And an id?"},
            {"role": "assistant", "content": "Its number."}]
    enc = tok.apply_chat_template(chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    assert tok.decode(ids) == ("<|bos|><|system|>Be brief.<|end|><|user|>What is a token?<|end|><|assistant|>"
                               "A piece of text.<|end|><|user|>And an id?<|end|><|assistant|>Its number.<|end|>")
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "A piece of text.<|end|>Its number.<|end|>"
    assistant_id = tok.convert_tokens_to_ids("<|assistant|>")
    assert all(m == 0 for i, m in zip(ids, mask) if i == assistant_id)
