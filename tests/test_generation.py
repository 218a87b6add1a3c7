"Stage 06: decoding strategies from scratch, token for token against transformers' generate."
import json

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from llm_lifecycle.generation import (StreamDecoder, apply_repetition_penalty, apply_temperature, beam_search,
                                      continuations, distinct_n, generate, mean_logprob, process_logits, stop_ids,
                                      top_k_filter, top_p_filter)
from llm_lifecycle.model import ModelConfig, TransformerLM, to_hf_llama

V, EOS, PAD = 96, 2, 0


def small_model(seed=0, vocab_size=V) -> TransformerLM:
    "A random model whose next-token distributions are peaked enough that float noise never flips an argmax."
    torch.manual_seed(seed)
    return TransformerLM(ModelConfig(vocab_size=vocab_size, d_model=32, n_layer=2, n_head=4, n_kv_head=2, max_seq_len=64,
                                     init_std=0.3)).eval()


def prompts(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, V, (1, int(torch.randint(2, 9, (1,), generator=g))), generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def pair():
    model = small_model()
    return model, to_hf_llama(model, eos_token_id=EOS, pad_token_id=PAD)


def hf_generate(hf, ids, **kw):
    return hf.generate(ids, attention_mask=torch.ones_like(ids), eos_token_id=EOS, pad_token_id=PAD, **kw)


def test_the_test_model_reaches_eos(pair):
    "The parity tests below exercise stopping: the stop token occurs in some greedy and beam outputs."
    model, _ = pair
    outs = [generate(model, p, 30, eos_token_id=EOS) for p in prompts(8)]
    assert any(EOS in o[0, p.size(1):].tolist() for o, p in zip(outs, prompts(8)))


@pytest.mark.parametrize("penalty", [None, 1.3])
def test_greedy_matches_transformers(pair, penalty):
    model, hf = pair
    for p in prompts(6):
        ours = generate(model, p, 30, eos_token_id=EOS, pad_token_id=PAD, repetition_penalty=penalty)
        theirs = hf_generate(hf, p, max_new_tokens=30, do_sample=False, repetition_penalty=penalty)
        assert ours.tolist() == theirs.tolist()


@pytest.mark.parametrize("num_beams,length_penalty,early_stopping",
                         [(4, 1.0, False), (2, 0.0, False), (3, 2.0, True), (5, 0.5, "never"), (4, -1.0, False)])
def test_beam_search_matches_transformers(pair, num_beams, length_penalty, early_stopping):
    model, hf = pair
    for p in prompts(6):
        ours, _ = beam_search(model, p, num_beams, 24, length_penalty, early_stopping, eos_token_id=EOS)
        theirs = hf_generate(hf, p, max_new_tokens=24, do_sample=False, num_beams=num_beams,
                             length_penalty=length_penalty, early_stopping=early_stopping)
        assert ours.tolist() == theirs.tolist()


def test_beam_search_with_several_stop_ids_matches_transformers(pair):
    model, hf = pair
    stops = [EOS, 7, 11]
    for p in prompts(4):
        ours, _ = beam_search(model, p, 3, 20, eos_token_id=stops)
        theirs = hf.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=20, do_sample=False, num_beams=3,
                             eos_token_id=stops, pad_token_id=PAD)
        assert ours.tolist() == theirs.tolist()


def test_sampling_draws_the_same_tokens_as_transformers(pair):
    model, hf = pair
    knobs = dict(temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.2)
    for i, p in enumerate(prompts(4)):
        torch.manual_seed(i); ours = generate(model, p, 20, do_sample=True, eos_token_id=EOS, pad_token_id=PAD, **knobs)
        torch.manual_seed(i); theirs = hf_generate(hf, p, max_new_tokens=20, do_sample=True, **knobs)
        assert ours.tolist() == theirs.tolist()


def test_kv_cache_gives_the_same_output(pair):
    model, _ = pair
    for p in prompts(3):
        batch = p.expand(3, -1)
        for kw in [dict(), dict(repetition_penalty=1.5)]:
            assert torch.equal(generate(model, batch, 40, use_cache=True, **kw), generate(model, batch, 40, use_cache=False, **kw))
        sample = lambda c: generate(model, batch, 40, do_sample=True, top_p=0.95, use_cache=c, generator=torch.Generator().manual_seed(5))
        assert torch.equal(sample(True), sample(False))
        assert torch.equal(beam_search(model, p, 4, 30, eos_token_id=EOS, use_cache=True)[0],
                           beam_search(model, p, 4, 30, eos_token_id=EOS, use_cache=False)[0])


def test_one_beam_is_greedy_and_beam_score_is_its_normalised_logprob(pair):
    model, _ = pair
    for p in prompts(3):
        assert torch.equal(beam_search(model, p, 1, 20)[0], generate(model, p, 20))
        seq, score = beam_search(model, p, 4, 20, length_penalty=1.0, eos_token_id=EOS)
        assert score == pytest.approx(mean_logprob(model, p, seq[0, p.size(1):].tolist()), abs=1e-4)


def test_filters_match_transformers_processors():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        logits, ids = torch.randn(4, 200, generator=g) * 3, torch.randint(0, 200, (4, 30), generator=g)
        for k in (1, 3, 50, 200, 500):
            assert torch.equal(top_k_filter(logits, k), TopKLogitsWarper(k)(ids, logits))
        for p in (0.01, 0.3, 0.8, 0.95, 1.0):
            assert torch.equal(top_p_filter(logits, p), TopPLogitsWarper(p)(ids, logits))
            assert torch.equal(top_p_filter(logits, p, 3), TopPLogitsWarper(p, min_tokens_to_keep=3)(ids, logits))
        for pen in (0.7, 1.0, 1.3, 2.0):
            assert torch.equal(apply_repetition_penalty(logits, ids, pen), RepetitionPenaltyLogitsProcessor(pen)(ids, logits.clone()))
        assert torch.equal(apply_temperature(logits, 0.6), TemperatureLogitsWarper(0.6)(ids, logits))
        chain = [RepetitionPenaltyLogitsProcessor(1.2), TemperatureLogitsWarper(0.7), TopKLogitsWarper(40), TopPLogitsWarper(0.9)]
        expected = logits.clone()
        for proc in chain: expected = proc(ids, expected)
        assert torch.equal(process_logits(logits, ids, True, 0.7, 40, 0.9, 1.2), expected)


def test_repetition_penalty_is_ctrls_asymmetric_rule():
    logits, ids = torch.tensor([[2.0, -2.0, 1.0]]), torch.tensor([[0, 1, 1]])
    assert apply_repetition_penalty(logits, ids, 2.0).tolist() == [[1.0, -4.0, 1.0]]


def test_greedy_ignores_warpers_and_top_p_keeps_the_nucleus():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    ids = torch.zeros(1, 1, dtype=torch.long)
    assert torch.equal(process_logits(logits, ids, do_sample=False, temperature=0.1, top_k=1, top_p=0.1), logits)
    p = logits.softmax(-1)[0]
    kept = torch.isfinite(top_p_filter(logits, float(p[0] + p[1]) - 1e-4))[0].tolist()
    assert kept == [True, True, False, False]


def test_stop_tokens_end_rows_and_pad_them(pair):
    model, _ = pair
    p = prompts(1)[0]
    free = generate(model, p, 20)[0, p.size(1):].tolist()
    stop = free[4]
    out = generate(model, torch.cat([p, p.flip(1)]), 20, eos_token_id=[EOS, stop], pad_token_id=PAD)
    row = continuations(out, p.size(1), [EOS, stop])[0]
    first = next(i for i, t in enumerate(free) if t in (EOS, stop))
    assert row == free[:first + 1]
    assert (out[0, p.size(1) + len(row):] == PAD).all()
    assert out.size(1) == p.size(1) + max(len(r) for r in continuations(out, p.size(1), [EOS, stop]))


def test_stop_strings_end_generation(tokenizer):
    model = small_model(vocab_size=len(tokenizer))
    p = torch.tensor([tokenizer("hello")["input_ids"]])
    free = generate(model, p, 12)[0, p.size(1):]
    stop = tokenizer.decode(free[3:5])
    assert stop
    out = generate(model, p, 12, stop_strings=[stop], tokenizer=tokenizer)
    text = tokenizer.decode(out[0, p.size(1):])
    assert stop in text and out.size(1) <= p.size(1) + 5
    assert stop not in tokenizer.decode(out[0, p.size(1):-1])


def test_bad_inputs_are_clear_errors(pair):
    model, _ = pair
    p = prompts(1)[0]
    with pytest.raises(ValueError, match="max_seq_len"): generate(model, p, 64)
    with pytest.raises(ValueError, match="max_new_tokens"): generate(model, p, 0)
    with pytest.raises(ValueError, match="batch, seq"): generate(model, p[0], 4)
    with pytest.raises(ValueError, match="tokenizer"): generate(model, p, 4, stop_strings=["x"])
    with pytest.raises(ValueError, match="temperature"): generate(model, p, 4, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"): generate(model, p, 4, do_sample=True, top_p=1.5)
    with pytest.raises(ValueError, match="one prompt"): beam_search(model, p.expand(2, -1), 2, 4)
    with pytest.raises(ValueError, match="early_stopping"): beam_search(model, p, 2, 4, early_stopping="sometimes")
    with pytest.raises(TypeError, match="eos_token_id"): stop_ids("</s>")


@pytest.fixture(scope="module")
def tokenizer():
    "A byte-level BPE trained in a blink, which splits characters it rarely saw into their UTF-8 bytes."
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<eos>"])
    tok.train_from_iterator(["hello world, the cat sat on the mat.", "日本語 is Japanese", "café au lait"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


TEXTS = ["Naïve café 😀 ok", "日本語 and 中文 mixed, 🎉🎉 and 👩‍👩‍👧 family", "plain ascii text", "é", "🙂",
         "混合 text: ½ ∑ → 😀 end"]


@pytest.mark.parametrize("text", TEXTS)
def test_stream_decoder_never_breaks_a_character(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    dec = StreamDecoder(tokenizer)
    pieces = [dec.push(i) for i in ids]
    rest = dec.flush()
    assert not any("\ufffd" in p for p in pieces + [rest])
    assert "".join(pieces) + rest == text


def test_the_stream_test_splits_characters(tokenizer):
    "Guard: per-token decoding of these texts does produce broken characters, so the test above tests something."
    ids = tokenizer(TEXTS[0] + TEXTS[1])["input_ids"]
    assert sum("\ufffd" in tokenizer.decode([i]) for i in ids) >= 4


def test_stream_decoder_as_streamer_reassembles_the_output(tokenizer):
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(vocab_size=len(tokenizer), d_model=32, n_layer=1, n_head=2, max_seq_len=128)).eval()
    p = torch.tensor([tokenizer("hello")["input_ids"]])
    dec, pieces = StreamDecoder(tokenizer), []
    out = generate(model, p, 60, do_sample=True, streamer=lambda t: pieces.append(dec.push(t)),
                   generator=torch.Generator().manual_seed(0))
    text = "".join(pieces) + dec.flush()
    assert text == tokenizer.decode(out[0, p.size(1):], skip_special_tokens=True)


def test_distinct_n():
    assert distinct_n([[1, 2, 3], [1, 2, 4]]) == 0.75
    assert distinct_n([[1, 1, 1, 1]], 1) == 0.25
    assert distinct_n([[1]], 2) == 0.0


def test_samples_json(tiny_run):
    samples = json.loads((tiny_run / "generation" / "samples.json").read_text())
    strategies = samples["strategies"]
    assert {"greedy", "beam", "temperature", "top_k", "top_p", "repetition_penalty"} <= set(strategies)
    n_prompts, n = len(samples["settings"]["prompts"]), samples["settings"]["n_samples"]
    for name, s in strategies.items():
        assert len(s["samples"]) == n_prompts
        assert all(len(p["texts"]) == n for p in s["samples"])
        assert any(t.strip() for p in s["samples"] for t in p["texts"]), name
        assert 0 < s["distinct_2"] <= 1 and s["mean_logprob"] < 0
    assert strategies["temperature"]["distinct_2"] > strategies["greedy"]["distinct_2"]
    assert strategies["greedy"]["mean_logprob"] > strategies["temperature"]["mean_logprob"]
    parity = samples["parity_with_transformers"]
    assert set(parity) == {"greedy", "sampling", "beam_search"}
    assert all(p["of"] > 0 and p["identical"] == p["of"] for p in parity.values())


def test_generation_metrics(tiny_run):
    "generation/metrics.json, the stage's marker: flat headline numbers that agree with samples.json."
    from llm_lifecycle.core import load_metrics
    m = load_metrics(tiny_run, "generation")
    r = m["results"]
    samples = json.loads((tiny_run / "generation" / "samples.json").read_text())
    assert all(isinstance(v, (bool, int, float)) for v in r.values())
    for name, s in samples["strategies"].items():
        assert r[f"{name}_distinct_2"] == s["distinct_2"] and r[f"{name}_mean_logprob"] == s["mean_logprob"]
    assert r["same_tokens_as_transformers"] is True
    assert r["outputs_compared_with_transformers"] == sum(p["of"] for p in samples["parity_with_transformers"].values())
    assert r["tokens_per_s_kv_cache"] > 0 and r["tokens_per_s_no_cache"] > 0
