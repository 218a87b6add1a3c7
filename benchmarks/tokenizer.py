"""Tokenizer training time and encoding throughput: from-scratch BPE (naive and fast), `tokenizers`, SentencePiece.

Prints JSON. The naive trainer recounts every pair after each merge, so it runs on a smaller sample; the fast
trainer runs on that same sample too, for the speed-up and the check that both learn identical merges.

    python benchmarks/tokenizer.py --run-dir runs/tiny
"""
import argparse, json, statistics, time
from pathlib import Path

from datasets import load_from_disk

from llm_lifecycle.core import project_root, stage_done
from llm_lifecycle.tokenizer import (BPETokenizer, sample_texts, train_bpe, train_bpe_naive, train_hf_bpe,
                                     train_sentencepiece)


def timed(fn, repeats:int):
    "The result of the last call of `fn` and the median wall time over `repeats` calls."
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter(); out = fn(); times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def throughput(encode, texts, repeats:int) -> float:
    "Median MB/s of `encode` over all `texts` (one call per text, or one call for the list when `encode` takes lists)."
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return n_bytes / timed(lambda: encode(texts), repeats)[1] / 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", default=str(project_root()/"runs"/"tiny"), help="run directory with data/ (stage 01)")
    ap.add_argument("--bytes", type=int, default=1_000_000, help="training sample size for the fast trainers")
    ap.add_argument("--naive-bytes", type=int, default=100_000, help="smaller sample for the naive vs fast comparison")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3, help="runs per measurement (the naive trainer runs once)")
    args = ap.parse_args()

    if not stage_done(args.run_dir, "data"): raise SystemExit(f"{args.run_dir} has no corpus; run stage 01_data first")
    corpus = load_from_disk(Path(args.run_dir)/"data")
    train = [t for t in corpus["train"]["text"] if t]
    val = [t for t in corpus["validation"]["text"] if t]
    sample, small = sample_texts(train, args.bytes), sample_texts(train, args.naive_bytes)
    size = lambda texts: sum(len(t.encode("utf-8")) for t in texts)
    v, r = args.vocab_size, args.repeats

    # min_frequency=1 everywhere: every trainer learns the full vocabulary, so the timings compare the same work
    naive_merges, naive_s = timed(lambda: train_bpe_naive(small, v, min_frequency=1), 1)
    fast_small_merges, fast_small_s = timed(lambda: train_bpe(small, v, min_frequency=1), r)
    merges, fast_s = timed(lambda: train_bpe(sample, v, min_frequency=1), r)
    hf, hf_s = timed(lambda: train_hf_bpe(sample, v, min_frequency=1), r)
    sp = {k: timed(lambda: train_sentencepiece(sample, v, k), r) for k in ["bpe", "unigram"]}

    def encode_ours(texts):  # a fresh tokenizer per measurement, so its chunk cache starts empty
        ours = BPETokenizer(merges)
        return [ours.encode(t) for t in texts]
    encoders = {"from scratch (ours), one call per text": encode_ours,
                "tokenizers, one call per text": lambda ts: [hf.encode(t).ids for t in ts],
                "tokenizers, encode_batch": lambda ts: hf.encode_batch(ts),
                **{f"SentencePiece {k}, batch": (lambda m: lambda ts: m.encode(ts))(m) for k, (m, _) in sp.items()}}
    print(json.dumps({
        "vocab_size": v, "sample_bytes": size(sample), "naive_sample_bytes": size(small), "validation_bytes": size(val),
        "repeats": r,
        "naive_vs_fast": {"naive_s": naive_s, "fast_s": fast_small_s, "speedup": naive_s / fast_small_s,
                          "merges": len(naive_merges), "identical_merges": naive_merges == fast_small_merges},
        "train_s": {"from scratch, fast": fast_s, "tokenizers": hf_s, "SentencePiece bpe": sp["bpe"][1],
                    "SentencePiece unigram": sp["unigram"][1]},
        "merges_learned": {"from scratch, fast": len(merges), "tokenizers": hf.get_vocab_size() - 256},
        "encode_MBps_validation": {k: throughput(enc, val, r) for k, enc in encoders.items()},
    }, indent=2))


if __name__ == "__main__":
    main()
