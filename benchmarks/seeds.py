"""Each headline figure of stages 07-10 per seed, from one base: does a result hold on seeds 0, 1 and 2, or only on one?

For each seed, a copy of `--run-dir` up to the stage before `--from` (the same data, tokenizer and base model), then
`llm-lifecycle run --from FROM --to TO --seed S` on it: the stage notebooks themselves, so every claim a notebook asserts
on `tiny` is checked on that seed too (a claim that fails stops the run, and the JSON says which stage failed and why).
Prints JSON: per seed, the stages that ran, whether they passed, their seconds and their headline figures; per figure,
its value on each seed, mean, min and max. Gains are paired per-prompt differences against SFT with their 95% interval.

    python benchmarks/seeds.py --run-dir runs/tiny --seeds 0 1 2            # 07-10 on three seeds (about 10 min a seed on 2 cores)
    python benchmarks/seeds.py --run-dir runs/tiny --seeds 1 --from 10      # stage 10 alone on seed 1, from runs/tiny's 07-09 (CI)
"""
import argparse, json, shutil, statistics, subprocess, sys, tempfile, time
from pathlib import Path

from llm_lifecycle.core import STAGES, get_stage, load_json, metrics_path

FIGURES = {  # stage -> the results keys reported per seed
    "sft": ["base_test_em", "sft_test_em", "sft_unseen_em", "base_test_bpb", "sft_test_bpb"],
    "peft_tuning": ["full_test_em", "lora_r8_test_em"],
    "reward": ["test_accuracy", "spearman_gold_within", "spearman_gold"],
    "rlhf": ["sft_gold", "sft_rm_score", "ppo_rm_score"] + [f"{m}_gain{s}" for m in ("best_of_4", "ppo", "ppo_gold", "dpo", "grpo", "grpo_gold", "ppo_overopt")
                            for s in ("", "_lo", "_hi")],
}


EXTRA = {"sft": ["instruct"], "peft_tuning": ["lora"], "reward": ["prefs"], "evaluation": ["report.md", "report"],
         "serving": ["feedback"]}  # what a stage writes beside the folder of its metrics.json


def copy_base(src:Path, dst:Path, first:str):
    "`src`'s run directory without the artifacts of `first` and the stages after it, its executed notebooks and checkpoints."
    later = [s.name for s in STAGES if int(s.num) >= int(get_stage(first).num)]
    drop = {metrics_path(s).split("/")[0] for s in later} | {x for s in later for x in EXTRA.get(s, [])} | {"notebooks", "checkpoints"}
    shutil.copytree(src, dst, ignore=lambda d, names: [n for n in names if Path(d) == src and n in drop])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", type=Path, required=True, help="a run that has done the stages before --from")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--from", dest="first", default="07")
    ap.add_argument("--to", dest="last", default="10")
    ap.add_argument("--keep", type=Path, default=None, help="keep each seed's run under this folder (default: a temporary one, removed)")
    a = ap.parse_args()
    src = a.run_dir.resolve()
    preset = load_json(src/"run.json")["preset"]
    stages = [s for s in STAGES if int(get_stage(a.first).num) <= int(s.num) <= int(get_stage(a.last).num)]
    root = Path(a.keep or tempfile.mkdtemp(prefix="seeds-")).resolve(); root.mkdir(parents=True, exist_ok=True)
    per_seed = {}
    for seed in a.seeds:
        run = root/f"seed{seed}"
        if run.exists(): shutil.rmtree(run)
        copy_base(src, run, a.first)
        t0 = time.time()
        r = subprocess.run(["llm-lifecycle", "run", "--preset", preset, "--run-dir", str(run), "--from", a.first, "--to", a.last,
                            "--seed", str(seed), "--no-progress"], capture_output=True, text=True)
        row = dict(passed=r.returncode == 0, seconds=round(time.time() - t0, 1))
        if r.returncode: row["failure"] = (r.stderr.strip().splitlines() or ["?"])[-1][:2000]
        for s in stages:
            p = run/metrics_path(s)
            if p.exists():
                m = load_json(p)
                row[s.name] = {k: m["results"][k] for k in FIGURES.get(s.name, []) if k in m["results"]}
                row[s.name]["seconds"] = m.get("seconds")
        per_seed[seed] = row
        print(json.dumps({"seed": seed, **row}), file=sys.stderr)  # progress, one line a seed
    figures = {}
    for s in stages:
        for k in FIGURES.get(s.name, []):
            vals = {seed: per_seed[seed].get(s.name, {}).get(k) for seed in a.seeds}
            got = [v for v in vals.values() if isinstance(v, (int, float))]
            if got: figures[f"{s.name}.{k}"] = dict(per_seed=vals, mean=round(statistics.fmean(got), 4), min=min(got), max=max(got))
    print(json.dumps(dict(run_dir=str(src), preset=preset, stages=[s.notebook for s in stages], seeds=a.seeds,
                          all_passed=all(r["passed"] for r in per_seed.values()), per_seed=per_seed, figures=figures), indent=1))
    if not a.keep: shutil.rmtree(root, ignore_errors=True)
    sys.exit(0 if all(r["passed"] for r in per_seed.values()) else 1)


if __name__ == "__main__":
    main()
