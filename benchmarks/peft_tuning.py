"""Fine-tuning cost per method: seconds per step, memory of a step, trainable parameters and bytes to save.

Prints JSON: for each method of stage 08 (full, last_layers, LoRA at each rank, QLoRA, prompt tuning, P-tuning),
trained from the run's `base/` on its `instruct/train` with stage 07's `SFTTrainer` settings, the median over
`--repeats` runs of the seconds per training step, and the memory of a step (`torch.cuda.max_memory_allocated` on
CUDA; on CPU the counted sum of weights, gradients, optimizer state and tensors saved for backward), the trainable
parameters and the bytes of what must be saved. Quality is the stage's business (`peft/metrics.json`), not this
script's: a few steps say nothing about it.

    python benchmarks/peft_tuning.py --run-dir runs/tiny
    python benchmarks/peft_tuning.py --run-dir runs/gpu --device cuda --steps 50 --batch-size 32
"""
import argparse, json, os, platform, statistics, warnings
from pathlib import Path

import torch
from datasets import load_from_disk

from llm_lifecycle.core import load_json, pick_device, stage_config
from llm_lifecycle.peft_tuning import PROMPT_METHODS, method_model, saved_bytes, train_method
from llm_lifecycle.sft import trainable_parameters


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", type=Path, required=True, help="a run with base/ (stage 05) and instruct/ (stage 07)")
    ap.add_argument("--methods", nargs="+", default=None, help="default: the run's preset's methods")
    ap.add_argument("--ranks", type=int, nargs="+", default=None, help="LoRA ranks; default: the preset's; QLoRA takes the first")
    ap.add_argument("--steps", type=int, default=10, help="timed training steps per run")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads; default: torch's choice")
    args = ap.parse_args()
    if args.threads: torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    device = pick_device(args.device)
    preset = load_json(args.run_dir/"run.json").get("preset", "tiny")
    knobs = stage_config("peft_tuning", preset)
    methods, ranks = args.methods or knobs["methods"], args.ranks or knobs["lora_ranks"]
    ds = load_from_disk(str(args.run_dir/"instruct"), keep_in_memory=True)
    train = ds["train"].shuffle(seed=0).select(range(min(args.steps * args.batch_size, len(ds["train"]))))
    jobs = [j for m in methods for j in ([(f"lora_r{r}", m, r) for r in ranks] if m == "lora" else [(m, m, ranks[0])])]
    out = {}
    for name, method, r in jobs:
        runs = []
        for _ in range(args.repeats):
            model, tok = method_model(method, args.run_dir/"base", r, knobs["lora_alpha"], knobs["prompt_tokens"], knobs["last_n"], device)
            context = model.config.max_position_embeddings - knobs["prompt_tokens"] * (method in PROMPT_METHODS)
            runs.append(train_method(model, tok, train, args.steps, args.batch_size, 1e-3, context, device=device, progress=False))
        out[name] = dict(seconds_per_step=round(statistics.median(r["seconds_per_step"] for r in runs), 4),
                         memory_mb=round(statistics.median(r["memory_mb"] for r in runs), 2), memory=runs[-1]["memory"],
                         trainable=trainable_parameters(model)[0], adapter_bytes=saved_bytes(model, method))
    print(json.dumps({"run_dir": str(args.run_dir), "preset": preset, "device": str(device), "threads": torch.get_num_threads(),
                      "machine": platform.processor() or platform.machine(), "steps": args.steps, "batch_size": args.batch_size,
                      "repeats": args.repeats,
                      "memory_measure": "torch.cuda.max_memory_allocated" if device.type == "cuda" else
                                        "counted: weights as stored + gradients + AdamW state + tensors saved for backward",
                      "methods": out}, indent=2))


if __name__ == "__main__":
    main()
