"""RLHF costs: rollout tokens/s of our KV-cache generation against `transformers`' `generate`, and gold reward per CPU-minute.

Prints JSON. Rollouts: the run's `sft/` samples `--samples` answers (temperature 1, up to `--new-tokens` tokens) to
each of `--prompts` prompts of stage 10's tasks; the median over `--repeats` runs of generated tokens per second for
our `generate` on `TransformerLM` as stage 10's `rollout` calls it (stage 06's KV cache; one call per prompt length,
since the model has no padding mask), for `transformers`' `generate` on the same weights one prompt per call, and for
it on all prompts in one left-padded batch. Per method: the held-out gold reward gained over the SFT model per
minute of training, read from the run's `rlhf/metrics.json` (stage 10 measures it; this script does not retrain).

    python benchmarks/rlhf.py --run-dir runs/tiny
"""
import argparse, json, platform, statistics, time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llm_lifecycle.core import load_json
from llm_lifecycle.model import load_hf
from llm_lifecycle.rlhf import rollout
from llm_lifecycle.sft import make_instructions, quiet_hf, stop_token_ids


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", type=Path, required=True, help="a run with sft/ (stage 07) and rlhf/ (stage 10)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    m = load_json(a.run_dir/"rlhf"/"metrics.json")
    tasks = m["details"]["tasks"]
    ds = make_instructions([], tasks, -(-a.prompts // len(tasks)), 0, history_frac=0, system_frac=0, seed=5)["train"]
    prompts = [r[:-1] for r in ds["messages"]][:a.prompts]
    sft = str(a.run_dir/"sft")
    with quiet_hf():
        tok = AutoTokenizer.from_pretrained(sft)
        ours, hf = load_hf(sft).eval(), AutoModelForCausalLM.from_pretrained(sft, dtype=torch.float32).eval()
    stops = stop_token_ids(tok)

    def ours_run(seed):
        return sum(len(s["response"]) for s in rollout(ours, tok, prompts, a.samples, a.new_tokens, 1.0, torch.Generator().manual_seed(seed)))

    @torch.no_grad()
    def hf_run(seed, batched):
        torch.manual_seed(seed); n = 0; tok.padding_side = "left"
        for g in ([prompts] if batched else [[p] for p in prompts]):
            enc = tok([tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in g], return_tensors="pt",
                      padding=True, add_special_tokens=False)
            out = hf.generate(**enc, do_sample=True, temperature=1.0, top_k=None, top_p=None, max_new_tokens=a.new_tokens,
                              num_return_sequences=a.samples, eos_token_id=stops, pad_token_id=tok.pad_token_id)
            for row in out[:, enc["input_ids"].shape[1]:].tolist(): n += next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        return n

    def bench(fn):
        fn(99)  # warm-up
        runs = []
        for r in range(a.repeats):
            t = time.perf_counter(); n = fn(r); runs.append((n / (time.perf_counter() - t), n))
        return dict(tokens_per_s=round(statistics.median(x for x, _ in runs), 1), tokens=[n for _, n in runs])

    table, sft_gold = m["details"]["table"], m["details"]["table"]["sft"]["gold"]
    print(json.dumps(dict(
        machine=dict(platform=platform.platform(), threads=torch.get_num_threads(), torch=torch.__version__),
        rollout=dict(prompts=len(prompts), samples_per_prompt=a.samples, max_new_tokens=a.new_tokens, repeats=a.repeats,
                     ours_kv_cache_batched_by_length=bench(ours_run), transformers_generate_per_prompt=bench(lambda s: hf_run(s, False)),
                     transformers_generate_one_batch=bench(lambda s: hf_run(s, True))),
        gold_per_cpu_minute={k: dict(gold_gain=round(r["gold"] - sft_gold, 4), seconds=r["seconds"],
                                     per_minute=round(60 * (r["gold"] - sft_gold) / r["seconds"], 4) if r["seconds"] else None)
                             for k, r in table.items() if k != "sft"}), indent=1))


if __name__ == "__main__": main()
