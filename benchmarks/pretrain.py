"""Pretraining speed and quality: our `TransformerLM` against `transformers`' `LlamaForCausalLM` of the same config.

Prints JSON. Both models start from the same weights (ours copied into Llama with `to_hf_llama`) and train with the
same AdamW groups, schedule, clipping and batches (same data generator seed) for a fixed wall-clock budget; then
tokens/s and validation bits per byte, the median over `--repeats` runs, the two models alternating.

    python benchmarks/pretrain.py --run-dir runs/tiny --seconds 60
    python benchmarks/pretrain.py --run-dir runs/gpu --gpu    # GPT-2-small shape, bf16, compiled: tokens/s and MFU
    python benchmarks/pretrain.py --compile --dtype bfloat16 --seconds 10 --repeats 1   # the GPU path's code, on CPU
"""
import argparse, json, statistics, time
from pathlib import Path

import torch

from llm_lifecycle.core import load_json, preset_config, project_root
from llm_lifecycle.encoding import get_batch, load_tokens
from llm_lifecycle.model import ModelConfig, TransformerLM, param_count, to_hf_llama
from llm_lifecycle.pretrain import (autocast, bits_per_byte, evaluate, lr_at, make_optimizer, mfu, next_token_loss,
                                    peak_flops)


def train_for(model, data, seconds:float, batch_size:int, block_size:int, lr:float, device, dtype, seed:int=0,
              warmup_steps:int=3) -> dict:
    "Train `model` (ours or `transformers`') for `warmup_steps` untimed steps (compilation happens there), then for `seconds` of wall time; steps and tokens/s of the timed part."
    opt = make_optimizer(model, lr, 0.1, (0.9, 0.95), device)
    gen = torch.Generator().manual_seed(seed)
    model.train()

    def step(i:int):
        for g in opt.param_groups: g["lr"] = lr_at(i, lr, lr / 10, 10, 10_000)
        x, y = get_batch(data, batch_size, block_size, gen, device)
        with autocast(device, dtype):
            out = model(x)
        loss = next_token_loss(out[0] if isinstance(out, tuple) else out.logits, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); opt.zero_grad(set_to_none=True)
        loss.item()  # waits for the device

    for i in range(warmup_steps): step(i)
    n, t0 = warmup_steps, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step(n); n += 1
    return dict(steps=n, tokens_per_s=(n - warmup_steps) * batch_size * block_size / (time.perf_counter() - t0))


def one_run(cfg:ModelConfig, kind:str, args, train, val, bpt:float, device, dtype, seed:int) -> dict:
    "Build the model of `kind` ('ours' or 'transformers') from seed `seed`, train it for the budget, evaluate it."
    torch.manual_seed(seed)
    ours = TransformerLM(cfg)
    model = (ours if kind == "ours" else to_hf_llama(ours)).to(device)
    if kind == "transformers": model.set_attn_implementation("sdpa")
    if args.compile: model = torch.compile(model)
    r = train_for(model, train, args.seconds, args.batch_size, cfg.max_seq_len, args.lr, device, dtype, seed)
    loss = evaluate(model, val, args.batch_size, cfg.max_seq_len, device, args.eval_iters, dtype)
    return {**r, "val_bpb": bits_per_byte(loss, bpt)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", default=str(project_root()/"runs"/"tiny"), help="run directory with tokens/ (stage 03)")
    ap.add_argument("--preset", default="tiny", help="the model shape: this preset's model section")
    ap.add_argument("--seconds", type=float, default=60, help="wall-clock training budget per run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--eval-iters", type=int, default=16, help="validation batches for the bits per byte")
    ap.add_argument("--compile", action="store_true", help="torch.compile both models")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="autocast dtype")
    ap.add_argument("--device", default=None, help="default: cuda with --gpu, else cpu")
    ap.add_argument("--gpu", action="store_true",
                    help="the H100 measurement: --preset gpu (GPT-2-small shape) --compile --dtype bfloat16 on CUDA, "
                         "batch of at least 16, lr at most 1e-3")
    args = ap.parse_args()
    if args.gpu:
        if not torch.cuda.is_available(): raise SystemExit("--gpu needs a CUDA device")
        args.preset, args.compile, args.dtype = "gpu", True, "bfloat16"
        args.batch_size, args.lr = max(args.batch_size, 16), min(args.lr, 1e-3)
    device = torch.device(args.device or ("cuda" if args.gpu else "cpu"))
    dtype = getattr(torch, args.dtype)

    tokens = Path(args.run_dir)/"tokens"
    if not (tokens/"meta.json").exists(): raise SystemExit(f"{tokens} has no encoded corpus; run stages 01-03 first")
    meta = load_json(tokens/"meta.json")
    train, val = load_tokens(tokens, "train"), load_tokens(tokens, "validation")
    cfg = ModelConfig(vocab_size=meta["vocab_size"], **preset_config(args.preset, "model"))
    bpt = meta["splits"]["validation"]["bytes_per_token"]

    runs = {"ours": [], "transformers": []}
    for i in range(args.repeats):
        for kind in runs: runs[kind].append(one_run(cfg, kind, args, train, val, bpt, device, dtype, seed=i))
    med = lambda kind, k: statistics.median(r[k] for r in runs[kind])
    peak = peak_flops(device)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "threads": torch.get_num_threads(),
        "preset": args.preset, "params": param_count(cfg), "seconds": args.seconds, "repeats": args.repeats,
        "batch_size": args.batch_size, "block_size": cfg.max_seq_len, "dtype": str(dtype), "compiled": args.compile,
        "peak_flops": peak, "peak_flops_source": "datasheet bf16" if device.type == "cuda" else "measured float32 matmul",
        **{kind: {"tokens_per_s": med(kind, "tokens_per_s"), "val_bpb": med(kind, "val_bpb"),
                  "steps": med(kind, "steps"), "mfu": mfu(med(kind, "tokens_per_s"), cfg, cfg.max_seq_len, peak),
                  "runs": runs[kind]} for kind in runs},
    }
    result["speedup_ours_vs_transformers"] = result["ours"]["tokens_per_s"] / result["transformers"]["tokens_per_s"]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
