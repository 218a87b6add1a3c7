"Stage 04: the transformer, its pieces, and its parity with transformers' Llama and Mixtral."
import json, math, os, subprocess, sys

import pytest
import torch
import torch.nn.functional as F

from llm_lifecycle.core import PRESETS, load_metrics, preset_config
from llm_lifecycle.model import (KVCache, ModelConfig, TransformerLM, MoEFeedForward, attention_maps, cached_logits,
                                 causal_mask, flops_per_token, from_hf_llama, load_balancing_loss, load_hf,
                                 logits_max_diff, manual_attention, param_count, repeat_kv, save_hf, to_hf_llama)

SMALL = dict(vocab_size=97, d_model=64, n_layer=2, n_head=4)


def small_model(seed=0, **kw) -> TransformerLM:
    torch.manual_seed(seed)
    return TransformerLM(ModelConfig(**{**SMALL, **kw})).eval()


@pytest.mark.parametrize("n_kv_head,tie", [(4, True), (4, False), (2, True), (2, False), (1, True)])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_llama_parity(n_kv_head, tie, impl):
    model = small_model(n_kv_head=n_kv_head, tie_embeddings=tie, rope_theta=500000.0)
    hf = to_hf_llama(model)
    hf.set_attn_implementation(impl)
    idx = torch.randint(0, 97, (3, 32), generator=torch.Generator().manual_seed(1))
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert hf.config.num_key_value_heads == n_kv_head and hf.config.tie_word_embeddings == tie
    assert logits_max_diff(model, hf, idx) < 1e-5
    back = from_hf_llama(hf)
    assert back.cfg == model.cfg
    assert torch.equal(back(idx)[0], model(idx)[0])


def test_moe_exports_to_mixtral():
    model = small_model(n_kv_head=2, n_experts=4, top_k_experts=2)
    hf = to_hf_llama(model)
    assert type(hf).__name__ == "MixtralForCausalLM"
    idx = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    assert logits_max_diff(model, hf, idx) < 1e-5
    assert torch.equal(from_hf_llama(hf)(idx)[0], model(idx)[0])


def test_export_folder_loads_without_llm_lifecycle(tmp_path):
    model = small_model(n_kv_head=2)
    save_hf(model, tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").exists() and (tmp_path / "m" / "config.json").exists()
    code = ("import sys, json, torch; from transformers import AutoModelForCausalLM; "
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); "
            "assert not any(k.startswith('llm_lifecycle') for k in sys.modules); "
            "print(json.dumps([type(m).__name__, m(torch.arange(12)[None]).logits[0].tolist()]))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m")], capture_output=True, text=True,
                         cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    name, logits = json.loads(out.stdout.strip().splitlines()[-1])
    assert name == "LlamaForCausalLM"
    with torch.no_grad(): ours = model(torch.arange(12)[None])[0][0]
    assert (torch.tensor(logits) - ours).abs().max().item() < 1e-5
    assert torch.equal(load_hf(tmp_path / "m")(torch.arange(12)[None])[0][0], ours)


def test_save_hf_records_token_ids(tmp_path):
    class Tok:  # the attributes save_hf reads from a tokenizer
        bos_token_id, eos_token_id, pad_token_id = 1, 2, 0
        def save_pretrained(self, path): (path / "tokenizer.json").write_text("{}")
    save_hf(small_model(), tmp_path / "m", tokenizer=Tok())
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 0)
    assert (tmp_path / "m" / "tokenizer.json").exists()


def test_sdpa_matches_manual_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 9, 16, generator=g).unbind(0)
    for q_len in (9, 3, 1):  # full sequence, then the KV-cache cases
        qq = q[..., -q_len:, :]
        mask = causal_mask(q_len, 9)
        ref, w = manual_attention(qq, k, v, mask)
        fused = F.scaled_dot_product_attention(qq, k, v, attn_mask=mask)
        assert (fused - ref).abs().max().item() < 1e-5
        assert torch.equal(w.triu(1 + 9 - q_len).abs().sum(), torch.tensor(0.0))
    assert (F.scaled_dot_product_attention(q, k, v, is_causal=True) - manual_attention(q, k, v, causal_mask(9))[0]).abs().max() < 1e-5


def test_gqa_shapes():
    model = small_model(n_kv_head=2)
    attn = model.blocks[0].attn
    x = torch.randn(2, 5, 64)
    q, k, v = attn.qkv(x, model.rope_cos[:5], model.rope_sin[:5])
    assert q.shape == (2, 4, 5, 16) and k.shape == v.shape == (2, 2, 5, 16)
    assert attn.k_proj.weight.shape == (32, 64)
    assert torch.equal(repeat_kv(k, 2)[:, 1], k[:, 0]) and torch.equal(repeat_kv(k, 2)[:, 2], k[:, 1])
    assert attn(x, model.rope_cos[:5], model.rope_sin[:5]).shape == x.shape


@pytest.mark.parametrize("kw", [dict(n_kv_head=2), dict(n_kv_head=4, n_experts=4, top_k_experts=2)])
def test_kv_cache_matches_full_forward(kw):
    model = small_model(**kw)
    idx = torch.randint(0, 97, (2, 14), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full, _ = model(idx)
        assert (cached_logits(model, idx, [9, 1, 1, 3]) - full).abs().max().item() < 1e-5
        cache = KVCache()
        model(idx[:, :13], kv_cache=cache)
        last, _ = model(idx[:, 13:], kv_cache=cache)
    assert cache.seq_len == 14 and len(cache.keys) == 2 and cache.keys[0].shape == (2, model.cfg.n_kv_head, 14, 16)
    assert (last[:, -1] - full[:, -1]).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="max_seq_len"): model(torch.zeros(1, 1, dtype=torch.long), kv_cache=_full_cache(model))


def _full_cache(model):
    cache = KVCache()
    with torch.no_grad(): model(torch.zeros(1, model.cfg.max_seq_len, dtype=torch.long), kv_cache=cache)
    return cache


@pytest.mark.parametrize("kw", [dict(n_kv_head=2), dict(n_kv_head=4, n_experts=4, top_k_experts=2)])
def test_attention_maps_are_the_weights_the_forward_pass_uses(monkeypatch, kw):
    "Every layer's map equals softmax(QK^T/sqrt(d)) of the queries and keys the fused kernel receives in `forward`."
    model = small_model(**kw)
    idx = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(3))
    seen, sdpa = [], F.scaled_dot_product_attention
    def spy(q, k, v, **kwargs):
        seen.append(manual_attention(q, k, v, causal_mask(q.size(2), k.size(2)))[1])
        return sdpa(q, k, v, **kwargs)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.no_grad(): model(idx)
    monkeypatch.undo()
    maps = attention_maps(model, idx)
    assert maps.shape == (2, 2, 4, 12, 12) and len(seen) == 2
    assert (maps - torch.stack(seen)).abs().max().item() < 1e-6
    assert torch.allclose(maps.sum(-1), torch.ones(2, 2, 4, 12)) and maps.triu(1).abs().max() == 0


def test_tiny_run_model_metrics(tiny_run):
    "Stage 04's model/metrics.json: what the notebook proves about the run's model."
    m = load_metrics(tiny_run, "model")
    r = m["results"]
    cfg = ModelConfig(vocab_size=preset_config("tiny", "tokenizer")["vocab_size"], **preset_config("tiny", "model"))
    assert (r["params"], r["flops_per_token"]) == (param_count(cfg), flops_per_token(cfg, cfg.max_seq_len))
    assert r["llama_max_logit_diff"] < 1e-6 and r["mixtral_max_logit_diff"] < 1e-5
    assert r["overfit_last_loss"] < 0.5 * r["overfit_first_loss"]


def test_moe_routing_and_loss():
    torch.manual_seed(0)
    cfg = ModelConfig(**SMALL, n_experts=4, top_k_experts=2)
    moe = MoEFeedForward(cfg)
    x = torch.randn(3, 5, 64)
    weights, experts, logits = moe.route(x.reshape(-1, 64))
    assert weights.shape == experts.shape == (15, 2) and logits.shape == (15, 4)
    assert torch.allclose(weights.sum(-1), torch.ones(15))
    assert (experts[:, 0] != experts[:, 1]).all() and experts.max() < 4
    out, router_logits = moe(x)
    assert out.shape == x.shape and torch.equal(router_logits, logits)
    assert math.isclose(load_balancing_loss(torch.zeros(20, 4), top_k=2).item(), 1.0, rel_tol=1e-6)
    collapsed = torch.tensor([[30.0, 0, 0, 0]]).expand(20, 4)
    assert math.isclose(load_balancing_loss(collapsed, top_k=1).item(), 4.0, rel_tol=1e-6)


def test_moe_model_adds_aux_loss():
    model = small_model(n_experts=4, top_k_experts=2, router_aux_loss_coef=0.5)
    idx = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(0))
    _, loss = model(idx, targets=idx)
    ce = F.cross_entropy(model(idx)[0].view(-1, 97), idx.view(-1))
    assert 1.0 <= model.aux_loss.item() <= 4.0
    assert math.isclose(loss.item(), ce.item() + 0.5 * model.aux_loss.item(), rel_tol=1e-5)
    with torch.no_grad():  # a router that ignores its input routes uniformly: aux loss 1, so coef · 1 is added
        for b in model.blocks: b.ffn.router.weight.zero_()
        _, loss = model(idx, targets=idx)
    assert math.isclose(model.aux_loss.item(), 1.0, rel_tol=1e-6)


@pytest.mark.parametrize("kw", [dict(), dict(n_kv_head=1, tie_embeddings=False), dict(n_experts=4, top_k_experts=1),
                                dict(d_ff=100, n_layer=3)])
def test_param_count(kw):
    cfg = ModelConfig(**{**SMALL, **kw})
    assert param_count(cfg) == sum(p.numel() for p in TransformerLM(cfg).parameters())


def test_preset_shapes():
    cfgs = [ModelConfig(vocab_size=preset_config(p, "tokenizer")["vocab_size"], **preset_config(p, "model")) for p in PRESETS]
    assert [param_count(c) for c in cfgs] == sorted(param_count(c) for c in cfgs)  # tiny < cpu < gpu
    gpu = ModelConfig(vocab_size=32768, **preset_config("gpu", "model"))
    assert 100e6 < param_count(gpu) < 150e6  # GPT-2-small class
    assert flops_per_token(gpu, 1024) > 6 * (param_count(gpu) - 32768 * 768 * 2)


def test_initial_loss_is_uniform():
    model = small_model()
    idx = torch.randint(0, 97, (4, 32), generator=torch.Generator().manual_seed(0))
    _, loss = model(idx, targets=idx.roll(-1, 1))
    assert abs(loss.item() - math.log(97)) < 0.05


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="multiple of n_head"): ModelConfig(d_model=100, n_head=3)
    with pytest.raises(ValueError, match="n_kv_head"): ModelConfig(n_head=4, n_kv_head=3)
    with pytest.raises(ValueError, match="vocab_size"): ModelConfig(vocab_size=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_compiled_matches_eager():
    model = small_model(n_kv_head=2).cuda().train()
    idx = torch.randint(0, 97, (4, 64), device="cuda")
    compiled = torch.compile(model, fullgraph=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, eager_loss = model(idx, targets=idx)
        _, compiled_loss = compiled(idx, targets=idx)
    compiled_loss.backward()
    assert abs(eager_loss.item() - compiled_loss.item()) < 1e-2
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_dense_forward_compiles_as_one_graph():
    model = small_model(n_kv_head=2).train()
    idx = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # fullgraph: any graph break is an error
    _, loss = compiled(idx, targets=idx)
    loss.backward()
    assert abs(loss.item() - model(idx, targets=idx)[1].item()) < 1e-5
