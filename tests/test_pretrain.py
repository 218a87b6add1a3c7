"Stage 05: pretraining. The tiny run's base model and experiments, the stage command, and the loop's parts: schedule, parameter groups, exact resume."
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from llm_lifecycle.core import load_json, load_metrics, save_json, stage_config, start_stage
from llm_lifecycle.encoding import load_tokens, tokens_meta, write_tokens
from llm_lifecycle.model import ModelConfig, TransformerLM
from llm_lifecycle.pretrain import (MIN_MARGIN_BPB, TrainConfig, bits_per_byte, causal_lm_loss, evaluate, lr_at, mlm_mask,
                                    param_groups, resume_is_exact, sized_config, train_base, train_dtype, unigram_loss)

MICRO = ModelConfig(vocab_size=64, d_model=32, n_layer=2, n_head=2, max_seq_len=16, dropout=0.1)


def synthetic_tokens(n=20_000, vocab=64, seed=0) -> np.ndarray:
    "A token stream with structure to learn: each token mostly follows from the previous one."
    rng = np.random.default_rng(seed)
    ids = np.empty(n, dtype=np.uint16)
    ids[0] = 0
    for i in range(1, n): ids[i] = (ids[i - 1] * 7 + 3) % vocab if rng.random() < 0.8 else rng.integers(vocab)
    return ids


def test_tiny_run_base_model(tiny_run):
    "The notebook's run (it calls `train_base`): base/metrics.json in the common shape, a model that beats the unigram baseline and reloads with transformers."
    from transformers import AutoModelForCausalLM
    metrics = load_metrics(tiny_run, "pretrain")
    r, d = metrics["results"], metrics["details"]
    assert metrics["stage"] == "pretrain" and metrics["preset"] == "tiny" and "warnings" not in metrics
    assert all(isinstance(v, (bool, int, float, str)) for v in r.values())  # results are flat: the report card joins them
    assert r["val_bpb"] < r["unigram_val_bpb"] - MIN_MARGIN_BPB
    assert r["test_bpb"] < r["unigram_test_bpb"] - MIN_MARGIN_BPB
    assert r["last_train_loss"] < r["first_train_loss"]
    assert d["history"]["val_loss"][-1] < d["history"]["val_loss"][0] and d["history"]["step"][-1] == r["steps"]
    assert r["steps"] > 0 and r["tokens_seen"] == r["steps"] * d["train"]["batch_size"] * d["train"]["block_size"] * d["train"]["grad_accum"]
    assert d["model"]["d_model"] == metrics["knobs"]["d_model"] and d["train"]["lr"] == metrics["knobs"]["lr"]
    hf = AutoModelForCausalLM.from_pretrained(tiny_run/"base", dtype=torch.float32)
    assert type(hf).__name__ == "LlamaForCausalLM"
    meta = load_json(tiny_run/"tokens"/"meta.json")
    val = load_tokens(tiny_run/"tokens", "validation")
    loss = evaluate(hf, val, 32, hf.config.max_position_embeddings)
    assert math.isclose(loss, r["val_loss"], rel_tol=1e-4)
    assert math.isclose(bits_per_byte(loss, meta["splits"]["validation"]["bytes_per_token"]), r["val_bpb"], rel_tol=1e-4)


def test_tiny_run_experiments(tiny_run):
    "The notebook's experiments live in pretrain/experiments.json, not in base/metrics.json."
    exp = load_json(tiny_run/"pretrain"/"experiments.json")
    assert "ddp_check" not in load_metrics(tiny_run, "pretrain").get("details", {})
    knobs = stage_config("pretrain", "tiny")
    assert [float(k) for k in exp["lr_sweep"]] == knobs["lr_sweep"]
    assert [[s["d_model"], s["n_layer"]] for s in exp["scaling"]] == knobs["scaling_sizes"]
    assert exp["mlm"]["last_loss"] < exp["mlm"]["first_loss"]
    # two processes (torchrun, gloo) with half the batch each ended where one process with the whole batch did
    ddp = exp["ddp_check"]
    assert ddp["relative_weight_diff"] < 1e-5
    assert all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(*ddp["val_loss"].values()))


def synthetic_run_dir(path:Path) -> Path:
    "A run directory holding what stage 05 reads: a small byte-level BPE tokenizer (stage 02) and splits of `synthetic_tokens` (stage 03)."
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<eos>"])
    tok.train_from_iterator(["the cat sat on the mat"] * 10, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    tokenizer.save_pretrained(path/"tokenizer")
    counts = {}
    for seed, split in enumerate(("train", "validation", "test")):
        ids = synthetic_tokens(n=20_000 if split == "train" else 2_000, seed=seed)
        write_tokens(ids, path/"tokens"/f"{split}.bin")
        counts[split] = dict(docs=1, tokens=len(ids), bytes=3 * len(ids))
    save_json(path/"tokens"/"meta.json", tokens_meta(tokenizer, counts))
    for marker in ("tokenizer", "tokens"): save_json(path/marker/"metrics.json", {})  # stages 02 and 03 are done
    return path


FEW_STEPS = dict(d_model=32, n_layer=2, n_head=2, n_kv_head=1, max_seq_len=16, max_steps=6, batch_size=4, warmup_steps=2,
                 eval_interval=3, eval_iters=2, ckpt_interval=0, max_epochs=0)


def test_stage_command_makes_what_the_notebook_makes(tmp_path):
    "`llm-lifecycle stage pretrain` and `train_base(run)`, which the notebook calls, write the same base/metrics.json results for the same knobs."
    import subprocess, sys
    cli, notebook = synthetic_run_dir(tmp_path/"cli"), synthetic_run_dir(tmp_path/"notebook")
    args = ["stage", "pretrain", "--preset", "tiny", "--run-dir", str(cli), "--device", "cpu", "--no-progress",
            *(f"-p{k}={v}" for k, v in FEW_STEPS.items())]
    r = subprocess.run([sys.executable, "-c", "import sys; from llm_lifecycle.cli import main; sys.exit(main(sys.argv[1:]))", *args],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "finished 05_pretrain" in r.stdout
    ours = train_base(start_stage("pretrain", "tiny", notebook, "cpu", **FEW_STEPS), progress=False)
    theirs = load_metrics(cli, "pretrain")
    assert ours == load_metrics(notebook, "pretrain") and set(ours) == set(theirs)
    assert ours["knobs"] == theirs["knobs"] and ours["details"].keys() == theirs["details"].keys()
    assert ours["details"]["model"] == theirs["details"]["model"] and ours["details"]["train"] == theirs["details"]["train"]
    for k, v in ours["details"]["history"].items(): assert v == pytest.approx(theirs["details"]["history"][k], rel=1e-5), k
    assert set(ours["results"]) == set(theirs["results"])
    for k, v in ours["results"].items():
        if k in ("tokens_per_s", "train_s", "mfu"): continue  # timings differ
        assert v == (pytest.approx(theirs["results"][k], rel=1e-5) if isinstance(v, float) else theirs["results"][k]), k
    assert ours["results"]["steps"] == 6 and ours["results"]["mfu_peak"] == "measured float32 matmul of this CPU"
    assert "unigram baseline" in ours["warnings"][0]  # 6 steps do not beat it by MIN_MARGIN_BPB: a warning, not an error
    assert sorted(p.name for p in (cli/"base").iterdir()) == sorted(p.name for p in (notebook/"base").iterdir())


def test_resume_is_bit_exact(tmp_path):
    tc = TrainConfig(max_steps=8, batch_size=4, block_size=16, grad_accum=2, warmup_steps=2, eval_interval=3,
                     eval_iters=2)
    assert resume_is_exact(synthetic_tokens(), MICRO, tc, stop_at=3, ckpt_dir=tmp_path/"ckpt")
    assert load_json(tmp_path/"ckpt"/"state.json")["step"] == 3


DDP_RESUME = """
import sys
import numpy as np, torch
from llm_lifecycle.model import ModelConfig
from llm_lifecycle.pretrain import TrainConfig, resume_is_exact
rng = np.random.default_rng(0)
data = np.empty(20_000, dtype=np.uint16); data[0] = 0
for i in range(1, len(data)): data[i] = (data[i - 1] * 7 + 3) % 64 if rng.random() < 0.8 else rng.integers(64)
cfg = ModelConfig(vocab_size=64, d_model=32, n_layer=2, n_head=2, max_seq_len=16)
tc = TrainConfig(max_steps=8, batch_size=4, block_size=16, grad_accum=2, warmup_steps=2, eval_interval=3, eval_iters=2)
exact = resume_is_exact(data, cfg, tc, stop_at=3, ckpt_dir=sys.argv[1])
print(f"rank {torch.distributed.get_rank()} of {torch.distributed.get_world_size()}: exact={exact}")
"""


def test_resume_is_bit_exact_on_two_processes(tmp_path):
    "Data-parallel on 2 CPU processes (torchrun, gloo): stopped, checkpointed and resumed equals straight, on each rank."
    import os, subprocess, sys
    (tmp_path/"resume.py").write_text(DDP_RESUME)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(tmp_path/"resume.py"), str(tmp_path/"ckpt")], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rank 0 of 2: exact=True" in r.stdout and "rank 1 of 2: exact=True" in r.stdout, r.stdout


def test_training_beats_unigram_on_synthetic_tokens():
    from llm_lifecycle.pretrain import pretrain
    data = synthetic_tokens()
    torch.manual_seed(0)
    model = TransformerLM(MICRO)
    tc = TrainConfig(max_steps=60, batch_size=8, block_size=16, lr=1e-2, min_lr=1e-3, warmup_steps=5, eval_interval=30,
                     eval_iters=4)
    hist = pretrain(model, data, data, tc, progress=False)
    assert hist["val_loss"][-1] < 0.7 * unigram_loss(data, data, 64)
    assert hist["tokens"] == 60 * tc.tokens_per_step


def test_fit_to_data_caps_epochs():
    tc = TrainConfig(max_steps=1000, batch_size=4, block_size=16, grad_accum=2, warmup_steps=50, max_epochs=3)
    cut = tc.fit_to_data(12_800, log=None)  # 3 passes over 12,800 tokens at 128 tokens per step: 300 steps
    assert (cut.max_steps, cut.warmup_steps) == (300, 30)
    assert tc.fit_to_data(12_800, num_processes=4, log=None).max_steps == 75
    assert tc.fit_to_data(10**6, log=None) is tc and TrainConfig(max_steps=10).fit_to_data(1, log=None).max_steps == 10
    said = []
    tc.fit_to_data(12_800, log=said.append)
    assert "cut to 300 steps" in said[0] and "10.0 times" in said[0]


def test_lr_schedule_shape():
    lrs = [lr_at(s, 1.0, 0.1, 10, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lr_at(55, 1.0, 0.1, 10, 100) == pytest.approx(0.55)  # half-way through the cosine: the middle
    assert lr_at(100, 1.0, 0.1, 10, 100) == lr_at(500, 1.0, 0.1, 10, 100) == 0.1


@pytest.mark.parametrize("tie", [True, False])
def test_param_groups(tie):
    model = TransformerLM(ModelConfig(**{**MICRO.__dict__, "tie_embeddings": tie}))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    decayed = {id(p) for p in decay["params"]}
    names = {n: id(p) in decayed for n, p in model.named_parameters()}
    assert not names["tok_emb.weight"] and not names["norm.weight"]
    assert all(names[n] for n in names if n.endswith("_proj.weight"))
    assert all(not names[n] for n in names if "norm" in n)
    if not tie: assert names["lm_head.weight"]
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == sum(p.numel() for p in model.parameters())


def test_causal_lm_loss_by_hand():
    logits = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, 7, (2, 5), generator=torch.Generator().manual_seed(1))
    logp = logits.log_softmax(-1)
    by_hand = -torch.stack([logp[b, t, ids[b, t + 1]] for b in range(2) for t in range(4)]).mean()
    assert torch.allclose(causal_lm_loss(logits, ids), by_hand)


def test_bits_per_byte_and_unigram():
    assert bits_per_byte(math.log(2) * 6, 3.0) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="positive"): bits_per_byte(1.0, 0.0)
    assert unigram_loss(np.array([0, 0, 0, 1]), np.array([0]), 2) == pytest.approx(-math.log(4 / 6))


def test_train_dtype_and_sizes():
    assert train_dtype("auto", "cpu") == torch.float32 and train_dtype("auto", "cuda") == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be"): train_dtype("fp16", "cpu")
    base = ModelConfig(vocab_size=64, d_model=128, n_head=4, n_kv_head=2)
    c = sized_config(base, 256, 6)
    assert (c.d_model, c.n_layer, c.head_dim, c.n_head // c.n_kv_head) == (256, 6, 32, 2)


def test_mlm_mask_proportions():
    ids = torch.randint(3, 1000, (200, 100), generator=torch.Generator().manual_seed(0))
    inputs, labels = mlm_mask(ids, 2, 1000, torch.Generator().manual_seed(1))
    chosen = labels != -100
    assert abs(chosen.float().mean().item() - 0.15) < 0.01
    assert abs((inputs[chosen] == 2).float().mean().item() - 0.8) < 0.02
    assert torch.equal(inputs[~chosen], ids[~chosen]) and torch.equal(labels[chosen], ids[chosen])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_pretrain_bf16_compiled():
    "The GPU path of the loop: bf16 autocast, torch.compile, fused AdamW, pinned batches; it must learn as on CPU."
    from llm_lifecycle.pretrain import pretrain
    data = synthetic_tokens()
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(**{**MICRO.__dict__, "dropout": 0.0}))
    tc = TrainConfig(max_steps=60, batch_size=8, block_size=16, lr=1e-2, min_lr=1e-3, warmup_steps=5, eval_interval=30,
                     eval_iters=4, dtype="auto", compile=True)
    hist = pretrain(model, data, data, tc, device="cuda", progress=False)
    assert next(model.parameters()).device.type == "cuda" and next(model.parameters()).dtype == torch.float32
    assert hist["val_loss"][-1] < 0.7 * unigram_loss(data, data, 64)
