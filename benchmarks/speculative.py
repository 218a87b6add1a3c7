"""Speculative decoding speed: ours next to `transformers`' assisted generation and prompt lookup, at identical output.

Prints JSON. The target is a run's chat model (`sft`, or any `load_chat_model` spec); the prompts are the questions
of the run's instruction test split, rendered by the chat template. Drafts are made from the target's own blocks
(`--draft-layers`), measured untrained and after `--distill-steps` of distillation on the training conversations
(each saved as a `transformers` folder under `--out` and used by `transformers` as `assistant_model`). For each
proposer and k: acceptance (accepted / proposed tokens), target forward passes, and the wall-clock speed-up over
plain greedy decoding with the KV cache (ours over our `generate`, theirs over their `generate`; each prompt's plain and
speculative runs timed one after the other, medians of `--repeats`); and whether every output equals plain greedy's
token for token; all per task too. Last, how close float32 comes to flipping a greedy choice between the two.

    python benchmarks/speculative.py --run-dir runs/tiny --threads 1                          # questions, SFT target
    python benchmarks/speculative.py --run-dir runs/tiny --scenario text --target base       # corpus text, base target
"""
import argparse, copy, json, platform, statistics, time
from pathlib import Path

import torch
from datasets import load_from_disk

from llm_lifecycle.encoding import get_batch, load_tokens
from llm_lifecycle.generation import generate
from llm_lifecycle.model import cached_logits, from_hf_llama, save_hf, to_hf_llama
from llm_lifecycle.sft import chat_prompts, load_chat_model, stop_token_ids
from llm_lifecycle.constellation import (PromptLookup, acceptance, conversation_batches, distill, draft_agreement, draft_from_target,
                                         hf_speculative, speculative_generate)


def paired_times(base:list, fns:list, repeats:int) -> tuple[list, list[float], list[float]]:
    "Outputs of the calls `fns`, and the median times of `base[i]` and `fns[i]`, timed one after the other (a warm-up round first)."
    outs = [f() for f in fns]
    tb, tf = [[] for _ in fns], [[] for _ in fns]
    for _ in range(repeats):
        for i, (b, f) in enumerate(zip(base, fns)):
            t0 = time.perf_counter(); b(); t1 = time.perf_counter(); outs[i] = f(); t2 = time.perf_counter()
            tb[i].append(t1 - t0); tf[i].append(t2 - t1)
    return outs, [statistics.median(t) for t in tb], [statistics.median(t) for t in tf]


@torch.no_grad()
def near_ties(target, prompts:list, outs:list, ks=(1, 2, 4, 8)) -> dict:
    "Float32 check on the greedy paths `outs`: logits of k+1-token verify forwards vs one-token forwards, and the top-2 gaps."
    diff, flips, n, gaps = 0.0, 0, 0, []
    for p, o in zip(prompts, outs):
        T0, L = p.size(1), o.size(1) - p.size(1)  # L logits decide the L new tokens
        if L < 2: continue
        one = cached_logits(target, o[:, :-1], [T0] + [1] * (L - 1))[0, T0 - 1:]
        top2 = one.topk(2, -1).values; gaps += (top2[:, 0] - top2[:, 1]).tolist()
        for k in ks:
            sizes, left = [T0 + min(k, L - 1)], L - 1 - min(k, L - 1)  # as a draft that is always right: prompt + k, then k + 1
            while left > 0: sizes.append(min(k + 1, left)); left -= sizes[-1]
            many = cached_logits(target, o[:, :-1], sizes)[0, T0 - 1:]
            diff = max(diff, (one - many).abs().max().item()); flips += int((one.argmax(-1) != many.argmax(-1)).sum()); n += L
    g = torch.tensor(gaps)
    return dict(positions=len(gaps), compared=n, argmax_flips=flips, max_abs_logit_diff=diff, min_top2_gap=g.min().item(),
                gaps_below={t: int((g < t).sum()) for t in (1e-4, 1e-3, 1e-2)})


def summarise(outs, times, ref_outs, ref_times, tasks) -> dict:
    "Acceptance, target calls, speed-up and identity over all prompts, and per task."
    def agg(idx):
        s = {k: sum(outs[i][1][k] for i in idx) for k in ("proposed", "accepted", "target_calls")}
        return dict(acceptance=round(acceptance(s), 3), target_calls=s["target_calls"],
                    speedup=round(sum(ref_times[i] for i in idx) / sum(times[i] for i in idx), 3),
                    identical=all(outs[i][0].tolist() == ref_outs[i].tolist() for i in idx))
    out = agg(range(len(outs)))
    out["per_task"] = {t: agg([i for i, u in enumerate(tasks) if u == t]) for t in dict.fromkeys(tasks)}
    return out


def chat_data(args, tok, target):
    "Chat prompts of the instruction test split (`--per-task` per task), stop tokens, and the conversations to distill on."
    ds, max_len = load_from_disk(str(Path(args.run_dir)/"instruct")), min(target.cfg.max_seq_len, 256)
    test = [r for t in dict.fromkeys(ds["test"]["task"]) for r in [r for r in ds["test"] if r["task"] == t][:args.per_task]]
    prompts = [tok(p, add_special_tokens=False, return_tensors="pt").input_ids for p in chat_prompts(tok, [r["messages"] for r in test])]
    return (prompts, [r["task"] for r in test], stop_token_ids(tok),
            conversation_batches(tok, ds["train"]["messages"], args.batch_size, max_len),
            conversation_batches(tok, ds["validation"]["messages"][:128], 32, max_len))


def text_data(args, tok, target):
    "The first `--prompt-tokens` of each held-out corpus document as prompts, end of document as the stop, windows of the training tokens to distill on."
    test, train, val = (load_tokens(Path(args.run_dir)/"tokens", s) for s in ("test", "train", "validation"))
    eos = tok.eos_token_id
    starts = [0] + [i + 1 for i in (test == eos).nonzero()[0].tolist()]
    prompts = [torch.from_numpy(test[s:s + args.prompt_tokens].astype("int64"))[None] for s in starts
               if s + args.prompt_tokens < len(test) and eos not in test[s:s + args.prompt_tokens]][:6 * args.per_task]
    g, T = torch.Generator().manual_seed(0), target.cfg.max_seq_len
    window = lambda data, b: (lambda x: (x, torch.ones_like(x, dtype=torch.bool)))(get_batch(data, b, T, g)[0])
    return (prompts, ["corpus text"] * len(prompts), [eos], [window(train, args.batch_size) for _ in range(200)], [window(val, 32) for _ in range(4)])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", default="runs/tiny")
    ap.add_argument("--scenario", default="chat", choices=["chat", "text"],
                    help="chat: answers to the instruction test split; text: continuations of held-out corpus documents")
    ap.add_argument("--target", default="sft", help="a load_chat_model spec: sft, base, smollm2, a folder")
    ap.add_argument("--prompt-tokens", type=int, default=32, help="prompt length (text scenario)")
    ap.add_argument("--draft-layers", default="0;0,3", help="blocks of the target per draft, drafts separated by ; (empty: prompt lookup only)")
    ap.add_argument("--distill-steps", type=int, default=300)
    ap.add_argument("--distill-lr", type=float, default=3e-3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--ks", default="1,2,3,4,6,8")
    ap.add_argument("--per-task", type=int, default=8, help="test prompts per task")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-hf", action="store_true", help="skip transformers' assisted generation")
    ap.add_argument("--out", default="/tmp/spec_drafts", help="where the distilled drafts are saved as transformers folders")
    args = ap.parse_args()
    torch.set_num_threads(args.threads); torch.manual_seed(0)

    hf_target, tok = load_chat_model(args.target, args.run_dir, chat=args.scenario == "chat")
    hf_target.eval()
    target, pad = from_hf_llama(hf_target).eval(), tok.pad_token_id
    prompts, tasks, eos, train, val = (chat_data if args.scenario == "chat" else text_data)(args, tok, target)
    mnt = [min(args.max_new_tokens, target.cfg.max_seq_len - p.size(1)) for p in prompts]
    ks = [int(k) for k in args.ks.split(",")]

    # drafts: untrained (the target's blocks) and distilled
    proposers, drafts_info = {}, {}
    for spec in filter(None, args.draft_layers.split(";")):
        layers = [int(x) for x in spec.split(",")]
        d = draft_from_target(target, layers)
        name = f"draft {layers}"
        proposers[f"{name} untrained"] = copy.deepcopy(d)
        before = draft_agreement(d, target, val)
        t0 = time.perf_counter(); losses = distill(d, target, train, args.distill_steps, args.distill_lr, progress=False)
        secs = time.perf_counter() - t0
        after = draft_agreement(d.eval(), target, val)
        proposers[f"{name} distilled"] = d
        save_hf(d, Path(args.out)/f"draft_{'_'.join(map(str, layers))}", tok)
        drafts_info[name] = dict(layers=layers, params=sum(p.numel() for p in d.parameters()), steps=args.distill_steps,
                                 lr=args.distill_lr, seconds=round(secs, 1), first_loss=round(losses[0], 3),
                                 last_loss=round(statistics.mean(losses[-10:]), 3),
                                 val_kl_before=round(before["kl"], 3), val_kl_after=round(after["kl"], 3),
                                 top1_agreement_before=round(before["top1_agreement"], 3),
                                 top1_agreement_after=round(after["top1_agreement"], 3))
    proposers["prompt lookup"] = PromptLookup(2)

    # plain greedy, ours and theirs; each speculative run is timed right after the plain run of the same prompt
    with torch.no_grad():
        plain = [lambda p=p, m=m: generate(target, p, m, eos_token_id=eos) for p, m in zip(prompts, mnt)]
        hf_plain = [lambda p=p, m=m: hf_target.generate(p, attention_mask=torch.ones_like(p), do_sample=False, max_new_tokens=m,
                                                        eos_token_id=eos, pad_token_id=pad) for p, m in zip(prompts, mnt)]
        ref, href = [f() for f in plain], [f() for f in hf_plain]
        results, speed = {}, {"ours": [], "transformers": []}
        for name, prop in proposers.items():
            hf_draft = None if isinstance(prop, PromptLookup) else to_hf_llama(prop, eos_token_id=tok.eos_token_id, pad_token_id=pad)
            for k in ks:
                outs, tb, t = paired_times(plain, [lambda p=p, m=m: speculative_generate(target, prop, p, k, m, eos)
                                                   for p, m in zip(prompts, mnt)], args.repeats)
                row = {"ours": summarise(outs, t, ref, tb, tasks)}; speed["ours"].append(sum(tb))
                if not args.no_hf:
                    outs, tb, t = paired_times(hf_plain, [lambda p=p, m=m: hf_speculative(hf_target, p, hf_draft, k, m, eos, pad)
                                                          for p, m in zip(prompts, mnt)], args.repeats)
                    row["transformers"] = summarise(outs, t, href, tb, tasks); speed["transformers"].append(sum(tb))
                results.setdefault(name, {})[k] = row
    new_tokens = sum(o.size(1) - p.size(1) for o, p in zip(ref, prompts))
    print(json.dumps({
        "target": dict(spec=args.target, d_model=target.cfg.d_model, n_layer=target.cfg.n_layer, vocab_size=target.cfg.vocab_size,
                       params=sum(p.numel() for p in target.parameters())),
        "prompts": len(prompts), "tasks": list(dict.fromkeys(tasks)), "mean_prompt_tokens": round(statistics.mean(p.size(1) for p in prompts), 1),
        "mean_new_tokens": round(new_tokens / len(prompts), 1), "max_new_tokens": args.max_new_tokens, "repeats": args.repeats,
        "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "plain_tokens_per_s": {k: round(new_tokens / statistics.median(v), 1) for k, v in speed.items() if v},
        "ours_plain_equals_transformers_plain": all(a.tolist() == b.tolist() for a, b in zip(ref, href)),
        "float32_near_ties": near_ties(target, prompts, ref), "drafts": drafts_info, "results": results,
    }, indent=1))


if __name__ == "__main__":
    main()
