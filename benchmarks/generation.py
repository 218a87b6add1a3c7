"""Greedy decoding speed with and without the KV cache: our `generate` next to `transformers`' `generate`.

Prints JSON: new tokens per second (median of several runs) for ours and for `transformers` on the same weights
(our model exported with `to_hf_llama`), with `use_cache` on and off, the speed-ups the cache gives, and whether
all four produced the same tokens. The model is a preset's shape with random weights (speed does not depend on
what the weights learned) and a context long enough for the prompt plus the new tokens.

    python benchmarks/generation.py --preset cpu --new-tokens 256
"""
import argparse, json, platform, statistics, time

import torch

from llm_lifecycle.core import pick_device, preset_config
from llm_lifecycle.generation import generate
from llm_lifecycle.model import ModelConfig, TransformerLM, to_hf_llama


def timed(fn, repeats:int):
    "The result of the last call of `fn` and the median wall time over `repeats` calls (after one warm-up call)."
    fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available(): torch.cuda.synchronize()
        t0 = time.perf_counter(); out = fn()
        if torch.cuda.is_available(): torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="cpu", help="whose model shape to use (tiny, cpu, gpu)")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads; 1 by default: one-token matmuls gain nothing from more, and on a shared "
                         "machine spinning threads make timings erratic")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)

    knobs = {**preset_config(args.preset, "model"), "max_seq_len": args.prompt_len + args.new_tokens, "dropout": 0.0}
    cfg = ModelConfig(vocab_size=preset_config(args.preset, "tokenizer")["vocab_size"], **knobs)
    torch.manual_seed(0)
    model = TransformerLM(cfg).to(device).eval()
    hf = to_hf_llama(model).to(device).eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_len), device=device)
    n = args.new_tokens

    def ours(cache): return lambda: generate(model, prompt, n, use_cache=cache)
    def theirs(cache):
        return lambda: hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                                   do_sample=False, use_cache=cache, pad_token_id=0)
    runs = {"ours, KV cache": ours(True), "ours, no cache": ours(False),
            "transformers, use_cache=True": theirs(True), "transformers, use_cache=False": theirs(False)}
    outs, tps = {}, {}
    with torch.no_grad():
        for name, fn in runs.items():
            outs[name], s = timed(fn, args.repeats)
            tps[name] = n / s
    first = next(iter(outs.values()))
    print(json.dumps({
        "model": dict(preset=args.preset, d_model=cfg.d_model, n_layer=cfg.n_layer, n_head=cfg.n_head,
                      n_kv_head=cfg.n_kv_head, vocab_size=cfg.vocab_size,
                      params=sum(p.numel() for p in model.parameters())),
        "prompt_tokens": args.prompt_len, "new_tokens": n, "repeats": args.repeats, "device": str(device),
        "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
        "kv_cache_speedup": {"ours": round(tps["ours, KV cache"] / tps["ours, no cache"], 2),
                             "transformers": round(tps["transformers, use_cache=True"] / tps["transformers, use_cache=False"], 2)},
        "ours_vs_transformers": {"with cache": round(tps["ours, KV cache"] / tps["transformers, use_cache=True"], 2),
                                 "without cache": round(tps["ours, no cache"] / tps["transformers, use_cache=False"], 2)},
        "identical_tokens": all(torch.equal(o, first) for o in outs.values()),
    }, indent=2))


if __name__ == "__main__":
    main()
