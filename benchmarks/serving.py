"""The server under concurrent streaming clients: time to first token, tokens per second per client and in all, errors.

Prints JSON. For each number of clients N, N threads each stream `--requests-per-client` chat completions through the
official `openai` client at once; every number is the median over `--repeats` rounds. Beside it, the reference: the
same requests handed to the engine in this process, without HTTP, one after another (what the server's queue does),
so the difference is the cost of FastAPI, uvicorn and server-sent events. The default model is the run's base model,
which never says <|end|>: every answer is `--max-tokens` long, so tokens per second mean something.

    python benchmarks/serving.py --run-dir runs/tiny --clients 1 4 16
"""
import argparse, json, platform, statistics, time
from pathlib import Path

import torch

from llm_lifecycle.serving import Engine, Server, load_test, make_app

QUESTIONS = ["What does this module provide?", "Explain the function's arguments.", "How do I open a file?", "What is a decorator?"]


def engine_alone(engine:Engine, conversations:list, max_tokens:int) -> dict:
    "The same requests through the engine's queue in this process, without HTTP: tokens per second, and seconds to the first piece."
    t0, ttft, tokens = time.perf_counter(), [], 0
    for m in conversations:
        s = time.perf_counter()
        job, first = engine.submit(m, max_tokens, temperature=0.0), None
        while (p := job.out.get()) is not None:
            if first is None: first = time.perf_counter() - s
        ttft.append(first); tokens += job.completion_tokens
    return dict(tokens_per_s_total=round(tokens / (time.perf_counter() - t0), 1), ttft_p50_s=round(statistics.median(ttft), 4))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", default="runs/tiny")
    ap.add_argument("--model", default="base", help="a model folder of the run (base, sft, rlhf/ppo, ...)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests-per-client", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads of the engine")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engine = Engine(Path(args.run_dir)/args.model, Path(args.model).name)
    convs = lambda n: [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}] for i in range(n)]
    rows = []
    with Server(make_app({engine.name: engine}, max_tokens_cap=args.max_tokens)) as srv:
        load_test(srv.url, engine.name, convs(2), 1, args.max_tokens, engine.tok)  # warm-up
        for n in args.clients:
            runs = [load_test(srv.url, engine.name, convs(n * args.requests_per_client), n, args.max_tokens, engine.tok) for _ in range(args.repeats)]
            med = lambda k: statistics.median(r[k] for r in runs)
            rows.append(dict(clients=n, requests=runs[0]["requests"], answered=min(r["answered"] for r in runs), errors=sum(r["errors"] for r in runs),
                             ttft_p50_s=med("ttft_p50_s"), ttft_p95_s=med("ttft_p95_s"), tokens_per_s_per_client=med("tokens_per_s_per_client"),
                             tokens_per_s_total=med("tokens_per_s_total")))
    alone = [engine_alone(engine, convs(4 * args.requests_per_client), args.max_tokens) for _ in range(args.repeats)]
    print(json.dumps(dict(
        model=dict(folder=str(Path(args.run_dir)/args.model), d_model=engine.lm.cfg.d_model, n_layer=engine.lm.cfg.n_layer,
                   params=sum(p.numel() for p in engine.lm.parameters())),
        max_tokens=args.max_tokens, repeats=args.repeats, threads=torch.get_num_threads(), machine=platform.processor() or platform.machine(),
        server=rows,
        engine_alone=dict(requests=4 * args.requests_per_client, tokens_per_s_total=statistics.median(a["tokens_per_s_total"] for a in alone),
                          ttft_p50_s=statistics.median(a["ttft_p50_s"] for a in alone)),
    ), indent=2))


if __name__ == "__main__":
    main()
