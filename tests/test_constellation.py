"""Stage 11: speculative decoding gives exactly greedy's tokens (a draft model or prompt lookup; ours and transformers'), the ONNX
export gives PyTorch's logits and tokens, the router's head, and the run's artifacts in fresh processes; Ray Serve answers as in process."""
import json, subprocess, sys
import pytest
import torch
import torch.nn.functional as F
from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

from llm_lifecycle.generation import generate
from llm_lifecycle.model import KVCache, ModelConfig, TransformerLM, to_hf_llama
from llm_lifecycle.constellation import (CONTINUATION, Constellation, DraftProposer, OnnxLM, PromptLookup, RayConstellation,
                                         crop_cache, distill, draft_agreement, draft_from_target, export_onnx, hf_speculative, kd_loss,
                                         onnx_generate, speculative_generate, train_head)

V, EOS, PAD = 96, 2, 0


def small_model(seed=0, n_layer=2) -> TransformerLM:
    "A random model whose next-token distributions are peaked enough that float noise never flips an argmax."
    torch.manual_seed(seed)
    return TransformerLM(ModelConfig(vocab_size=V, d_model=32, n_layer=n_layer, n_head=4, n_kv_head=2, max_seq_len=64,
                                     init_std=0.3)).eval()


def prompts(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, V, (1, int(torch.randint(1, 10, (1,), generator=g))), generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def target(): return small_model(0, n_layer=3)


@pytest.fixture(scope="module")
def drafts(target):
    "Proposers from always right to mostly wrong: the target itself, its first block, an unrelated random model, prompt lookup."
    return {"self": target, "first_block": draft_from_target(target, [0]), "random": small_model(7, n_layer=1),
            "lookup": PromptLookup(2)}


def test_the_test_model_reaches_eos(target):
    assert any(EOS in generate(target, p, 40, eos_token_id=EOS)[0, p.size(1):].tolist() for p in prompts(8))


CASES = [(30, EOS), (13, None)]  # (max_new_tokens, stop token): stopped by the stop token, and by the length


@pytest.fixture(scope="module")
def greedy(target):
    "Plain greedy outputs of every prompt and case, computed once."
    return {(i, c): generate(target, p, c[0], eos_token_id=c[1]).tolist() for i, p in enumerate(prompts()) for c in CASES}


@pytest.mark.parametrize("name", ["self", "first_block", "random", "lookup"])
@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_same_tokens_as_generate(target, drafts, greedy, name, k):
    for i, p in enumerate(prompts()):
        for mnt, eos in CASES:
            ours, stats = speculative_generate(target, drafts[name], p, k=k, max_new_tokens=mnt, eos_token_id=eos)
            assert ours.tolist() == greedy[i, (mnt, eos)]
            n_new = ours.size(1) - p.size(1)
            assert stats["accepted"] <= stats["proposed"] <= k * stats["target_calls"]
            assert n_new <= stats["accepted"] + stats["target_calls"]  # each round: the accepted proposals + the target's token
            if eos is None: assert n_new == stats["accepted"] + stats["target_calls"] == mnt
            if name == "self": assert stats["accepted"] == stats["proposed"]


def test_one_new_token(target, drafts):
    p = prompts(1)[0]
    out, stats = speculative_generate(target, drafts["first_block"], p, k=4, max_new_tokens=1)
    assert out.tolist() == generate(target, p, 1).tolist() and stats == dict(proposed=0, accepted=0, target_calls=1, draft_calls=0)


def test_a_bad_draft_is_rejected_but_harmless(target, drafts):
    "The unrelated draft is mostly rejected (so the rejection path is exercised), the self-draft always accepted."
    tot = {n: [0, 0, 0] for n in ("self", "random")}
    for p in prompts(4):
        for n in tot:
            out, s = speculative_generate(target, drafts[n], p, k=4, max_new_tokens=20)
            tot[n][0] += s["accepted"]; tot[n][1] += s["proposed"]; tot[n][2] += s["target_calls"]
    assert tot["random"][0] < 0.5 * tot["random"][1]
    assert tot["self"][0] == tot["self"][1] and tot["self"][2] < tot["random"][2]


def test_draft_calls_are_counted(target, drafts):
    out, s = speculative_generate(target, drafts["first_block"], prompts(1)[0], k=4, max_new_tokens=20)
    assert s["draft_calls"] == s["proposed"]  # one draft forward per proposed token (the prefill is the first)
    assert speculative_generate(target, drafts["lookup"], prompts(1)[0], k=4, max_new_tokens=20)[1]["draft_calls"] == 0


def test_crop_cache(target):
    idx = torch.randint(0, V, (2, 12))
    cache = KVCache()
    target(idx[:, :10], kv_cache=cache)
    crop_cache(cache, 6)
    assert cache.seq_len == 6 and all(k.size(2) == 6 for k in cache.keys + cache.values)
    cropped = target(idx[:, 6:], kv_cache=cache)[0]  # positions 6.. after a cache cropped from 10 to 6
    torch.testing.assert_close(cropped, target(idx)[0][:, 6:], rtol=1e-5, atol=1e-5)
    crop_cache(cache, 0)
    assert cache.seq_len == 0
    torch.testing.assert_close(target(idx, kv_cache=cache)[0], target(idx)[0], rtol=1e-5, atol=1e-5)


def test_prompt_lookup_proposals():
    t = lambda *x: torch.tensor([x])
    ids = t(5, 9, 3, 5, 7, 3, 5)
    assert PromptLookup(2)(ids, 3) == [7, 3, 5]  # the bigram (3, 5) wins over the unigram 5
    assert PromptLookup(1)(ids, 3) == [9, 3, 5]  # unigram: the leftmost earlier 5
    assert PromptLookup(2)(ids, 10) == [7, 3, 5]  # no further than the end of the sequence
    assert PromptLookup(2)(ids, 3, eos={3}) == [7]  # stops before a stop token
    assert PromptLookup(2)(ids, 3, eos={7}) == []
    assert PromptLookup(2)(t(1, 2, 3, 4), 3) == [] and PromptLookup(2)(t(1), 3) == []
    assert PromptLookup(3)(t(1, 2, 3, 8, 2, 3, 9, 1, 2, 3), 2) == [8, 2]  # the trigram (1, 2, 3), not the later bigram


def test_prompt_lookup_matches_transformers():
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        ids = torch.randint(0, 6, (1, int(torch.randint(2, 30, (1,), generator=g))), generator=g)
        k = int(torch.randint(1, 6, (1,), generator=g))
        hf = PromptLookupCandidateGenerator(eos_token_id=torch.tensor([EOS]), num_output_tokens=k, max_matching_ngram_size=2,
                                            max_length=1000)
        assert PromptLookup(2)(ids, k, eos={EOS}) == hf.get_candidates(ids)[0][0, ids.size(1):].tolist()


def test_draft_proposer_follows_the_sequence(target):
    "Fed the tokens the verify loop keeps, the draft's cached proposals equal a fresh run of the draft."
    d, p = draft_from_target(target, [1]), prompts(1)[0]
    prop, seq = DraftProposer(d), p
    for extra in ([], [3, 4], [9], [10, 11, 12]):
        seq = torch.cat([seq, torch.tensor([extra], dtype=seq.dtype)], dim=1)
        assert prop(seq, 4) == generate(d, seq, 4)[0, seq.size(1):].tolist()


def test_draft_from_target(target):
    x = torch.randint(0, V, (2, 10))
    torch.testing.assert_close(draft_from_target(target, [0, 1, 2])(x)[0], target(x)[0])  # every block: the target itself
    d = draft_from_target(target, [0, 2])
    assert d.cfg.n_layer == 2 and torch.equal(d.blocks[1].attn.q_proj.weight, target.blocks[2].attn.q_proj.weight)
    d.blocks[1].attn.q_proj.weight.data += 1  # a copy, not shared
    assert not torch.equal(d.blocks[1].attn.q_proj.weight, target.blocks[2].attn.q_proj.weight)
    with pytest.raises(ValueError): draft_from_target(target, [3])


def test_kd_loss():
    s, t = torch.randn(2, 5, V), torch.randn(2, 5, V)
    want = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1).mean()
    torch.testing.assert_close(kd_loss(s, t), want)
    assert kd_loss(t, t).abs() < 1e-6
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    torch.testing.assert_close(kd_loss(s, t, mask), kd_loss(s[mask][None], t[mask][None]))


def test_distill_brings_the_draft_closer(target):
    torch.manual_seed(0)
    batches = [(ids, torch.ones_like(ids, dtype=torch.bool)) for ids in (torch.randint(4, V, (4, 16)) for _ in range(4))]
    d = draft_from_target(target, [0])
    before = draft_agreement(d, target, batches)
    losses = distill(d, target, batches, steps=20, lr=1e-2, progress=False)
    after = draft_agreement(d, target, batches)
    assert len(losses) == 20 and after["kl"] < 0.7 * before["kl"] and after["top1_agreement"] > before["top1_agreement"]


@pytest.mark.parametrize("k", [1, 4])
def test_transformers_assisted_and_prompt_lookup_match_greedy(target, k):
    t_hf, d_hf = to_hf_llama(target), to_hf_llama(draft_from_target(target, [0]))
    for p in prompts(2):
        plain = t_hf.generate(p, attention_mask=torch.ones_like(p), do_sample=False, max_new_tokens=30, eos_token_id=EOS, pad_token_id=PAD)
        ours = speculative_generate(target, draft_from_target(target, [0]), p, k=k, max_new_tokens=30, eos_token_id=EOS)[0]
        for draft in (d_hf, None):
            out, stats = hf_speculative(t_hf, p, draft, k=k, max_new_tokens=30, eos_token_id=EOS, pad_token_id=PAD)
            assert out.tolist() == plain.tolist() == ours.tolist()
            assert 0 <= stats["accepted"] <= stats["proposed"]


TOL = 1e-4  # float32; the measured differences are ~1e-6

@pytest.fixture(scope="module")
def onnx_pair(tmp_path_factory):
    "A random small grouped-query model with untied head, and its export in an ONNX Runtime session."
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(vocab_size=512, d_model=64, n_layer=2, n_head=4, n_kv_head=2, max_seq_len=64,
                                      tie_embeddings=False)).eval()
    path = export_onnx(model, tmp_path_factory.mktemp("onnx") / "model.onnx")
    return model, OnnxLM(path)

def test_onnx_prefill_logits(onnx_pair):
    model, lm = onnx_pair
    idx = torch.randint(512, (2, 9))
    logits, cache = lm(idx)
    with torch.no_grad(): ref = model(idx)[0]
    assert (torch.from_numpy(logits) - ref).abs().max() < TOL
    assert [c.shape for c in cache] == [(2, 2, 9, 16)] * 4

def test_onnx_cache_step_equals_full_forward(onnx_pair):
    model, lm = onnx_pair
    idx = torch.randint(512, (1, 12))
    full = torch.from_numpy(lm(idx)[0])
    logits, cache = lm(idx[:, :7])
    for t in range(7, 12):
        step, cache = lm(idx[:, t:t + 1], cache)
        assert (torch.from_numpy(step[:, 0]) - full[:, t]).abs().max() < TOL
    with torch.no_grad():
        kv = KVCache(); model(idx[:, :7], kv_cache=kv); ref = model(idx[:, 7:], kv_cache=kv)[0]  # several tokens after a cache
    assert (torch.from_numpy(lm(idx[:, 7:], lm(idx[:, :7])[1])[0]) - ref).abs().max() < TOL
    assert all((torch.from_numpy(c) - r).abs().max() < TOL for c, r in zip(cache, [t for p in zip(kv.keys, kv.values) for t in p]))

def test_onnx_greedy_identical(onnx_pair):
    model, lm = onnx_pair
    for seed in range(3):
        idx = torch.randint(512, (1, 5 + seed), generator=torch.Generator().manual_seed(seed))
        eos = int(idx[0, -1])  # a token the model may well produce
        assert torch.equal(onnx_generate(lm, idx, 20, eos_token_id=eos), generate(model, idx, 20, eos_token_id=eos))
    batch = torch.randint(512, (3, 6), generator=torch.Generator().manual_seed(9))  # rows stop at different steps: padded
    assert torch.equal(onnx_generate(lm, batch, 12, eos_token_id=batch[:, -1].tolist()), generate(model, batch, 12, eos_token_id=batch[:, -1].tolist()))
    assert torch.equal(onnx_generate(lm, [3, 4, 5], 4), generate(model, torch.tensor([[3, 4, 5]]), 4))  # a list is one row

def test_onnx_too_long(onnx_pair):
    with pytest.raises(ValueError): onnx_generate(onnx_pair[1], torch.zeros(1, 60, dtype=torch.long), 10)


def test_router_head_separates_what_is_separable():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=g) * 3
    y = torch.arange(300) % 3
    x = centres[y] + torch.randn(300, 16, generator=g)
    w = train_head(x, y, 3, steps=200)
    assert w.shape == (3, 16) and ((x @ w.T).argmax(1) == y).float().mean() > 0.97


def fresh(code:str) -> str:
    "Run `code` in a fresh Python process (offline); its stdout."
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_router_is_a_plain_classifier_folder(tiny_run):
    "The saved router loads with transformers alone and names the kind of validation requests (the templates it trained on)."
    from datasets import load_from_disk
    val = load_from_disk(str(tiny_run/"instruct"))["validation"]
    texts = [m[-2]["content"] for m in val["messages"]][::4]
    cont = [t[:120] for t in load_from_disk(str(tiny_run/"data"))["validation"]["text"][:10]]
    code = f"""
import json, torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
d = {str(tiny_run/"constellation"/"router")!r}
tok, m = AutoTokenizer.from_pretrained(d), AutoModelForSequenceClassification.from_pretrained(d).eval()
out = []
for t in json.loads({json.dumps(json.dumps(texts + cont))}):
    with torch.no_grad(): out.append(m.config.id2label[int(m(**tok(t, return_tensors="pt")).logits.argmax())])
print(json.dumps(out))
"""
    got = json.loads(fresh(code))
    want = list(val["task"][::4]) + [CONTINUATION] * len(cont)
    # 0.87 on tiny's standard-library corpus, 0.89 and 0.79 on two earlier ones; always the commonest kind gets 0.17 (12 of 70)
    assert sum(g == w for g, w in zip(got, want)) / len(want) > 0.7, list(zip(got, want))


def test_draft_folder_is_transformers_assistant(tiny_run):
    "The saved draft is a plain model folder that transformers uses as `assistant_model`; the SFT model's greedy tokens are unchanged."
    code = f"""
import json, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
sft, draft = {str(tiny_run/"sft")!r}, {str(tiny_run/"constellation"/"draft")!r}
tok, t, d = AutoTokenizer.from_pretrained(sft), AutoModelForCausalLM.from_pretrained(sft), AutoModelForCausalLM.from_pretrained(draft)
assert d.config.num_hidden_layers < t.config.num_hidden_layers
same = []
for q in ["How many words are in this text: red blue cat", "Which is larger, 12 or 40?", "The function returns"]:
    ids = tok(tok.apply_chat_template([dict(role="user", content=q)], tokenize=False, add_generation_prompt=True), return_tensors="pt", add_special_tokens=False).input_ids
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=24, pad_token_id=tok.pad_token_id)
    same.append(torch.equal(t.generate(ids, **kw), t.generate(ids, assistant_model=d, **kw)))
print(json.dumps(same))
"""
    assert json.loads(fresh(code)) == [True] * 3


def test_onnx_file_generates_with_onnxruntime_alone(tiny_run):
    "The exported file runs in ONNX Runtime with numpy (no torch imported) and gives the SFT model's greedy answer."
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_run/"sft")
    ids = tok(tok.apply_chat_template([dict(role="user", content="Which is larger, 12 or 40?")], tokenize=False, add_generation_prompt=True),
              add_special_tokens=False).input_ids
    want = AutoModelForCausalLM.from_pretrained(tiny_run/"sft").generate(torch.tensor([ids]), do_sample=False, max_new_tokens=12,
                                                                          eos_token_id=None, pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
    code = f"""
import json, sys, numpy as np, onnxruntime as ort
s = ort.InferenceSession({str(tiny_run/"constellation"/"onnx"/"model.onnx")!r}, providers=["CPUExecutionProvider"])
past = [i for i in s.get_inputs()[1:]]
cache = [np.zeros((1, p.shape[1], 0, p.shape[3]), np.float32) for p in past]
ids, out = np.array([{ids!r}], dtype=np.int64), []
for _ in range(12):
    logits, *cache = s.run(None, dict(input_ids=ids, **{{p.name: c for p, c in zip(past, cache)}}))
    out.append(int(logits[0, -1].argmax())); ids = np.array([[out[-1]]], dtype=np.int64)
assert "torch" not in sys.modules
print(json.dumps(out))
"""
    assert json.loads(fresh(code)) == want


def test_ray_serve_answers_as_in_process(tiny_run):
    "The constellation on Ray Serve (real processes: a deployment per model, the router as ingress) gives the in-process answers."
    from datasets import load_from_disk
    routes = json.loads((tiny_run/"constellation"/"routes.json").read_text())
    members = {m: tiny_run/("lora" if m == "lora" else "rlhf/" + m if m not in ("base", "sft") else m) for m in set(routes.values())}
    val = load_from_disk(str(tiny_run/"instruct"))["test"]
    reqs = [dict(text=m[-2]["content"], messages=m[:-1]) for m in val["messages"][::20]]
    reqs += [t[:100] for t in load_from_disk(str(tiny_run/"data"))["test"]["text"][:3]]  # plain texts, for the base model to continue
    router = tiny_run/"constellation"/"router"
    want = Constellation(members, router, routes, tiny_run).answer(reqs)
    assert {w["model"] for w in want} and all(w["answer"] is not None for w in want)
    with RayConstellation(members, router, routes, tiny_run) as rc:
        assert rc.answer(reqs) == want


@pytest.mark.parametrize("case", ["random", "draft misses a token", "draft proposes what the target never says"])
def test_speculative_sampling_emits_the_targets_distribution(case):
    "The acceptance rule min(1, p/q) with the residual norm(max(0, p − q)): the first emitted token follows the target's p (χ², 5 d.o.f., under its 0.1% critical value 20.5), and is far from the draft's q."
    from llm_lifecycle.constellation import chi_square, speculative_accept
    g = torch.Generator().manual_seed(3)
    p, q = torch.softmax(2 * torch.randn(4, 6, generator=g), -1), torch.softmax(2 * torch.randn(3, 6, generator=g), -1)
    if case == "draft misses a token": q[:, 0] = 0; q /= q.sum(-1, keepdim=True); p[:, 0] += 0.2; p /= p.sum(-1, keepdim=True)
    if case == "draft proposes what the target never says": p[:, 5] = 0; p /= p.sum(-1, keepdim=True); q[:, 5] += 0.5; q /= q.sum(-1, keepdim=True)
    first = torch.zeros(6)
    for _ in range(20_000):
        first[speculative_accept(p, q, [int(torch.multinomial(q[i], 1, generator=g)) for i in range(3)], g)[0]] += 1
    keep = p[0] > 0  # a token the target never says must never come out
    assert first[~keep].sum() == 0
    assert chi_square(first[keep], p[0][keep]) < 20.5 and chi_square(first[keep], q[0][keep] / q[0][keep].sum()) > 100
