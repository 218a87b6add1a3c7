"""Stage 01 benchmark: cleaning throughput on the default corpus, and MinHash near-dedup time and recall.

    python benchmarks/data.py [--repeats 3] [--sources pydoc docstrings ...] [--max-docs N]

Prints one JSON object: medians over `--repeats` runs. MinHash signatures are timed three ways on the same
documents: the naive per-permutation Python loop (on a subset), our vectorised NumPy version, and `datasketch`
(the same legacy scheme, so the signatures are identical, and its default affine32 scheme).
"""
import argparse, json, os, platform, statistics, time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets
import numpy as np
from datasets import Dataset
from datasketch import MinHash

from llm_lifecycle.core import preset_config
from llm_lifecycle.data import (clean_corpus, collect, dedup_eval, minhash, minhash_naive, minhash_permutations,
                                near_duplicate_pairs, shingles)


def median_time(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter(); out = fn(); times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    tiny = preset_config("tiny", "data")
    ap.add_argument("--sources", nargs="+", default=tiny["sources"], help="default: the tiny preset's")
    ap.add_argument("--max-docs", type=int, default=None)
    ap.add_argument("--num-perm", type=int, default=tiny["num_perm"], help="default: the tiny preset's")
    ap.add_argument("--bands", type=int, default=tiny["bands"], help="default: the tiny preset's")
    a = ap.parse_args()
    datasets.disable_progress_bars()

    t_collect, (raw, _) = median_time(lambda: collect(a.sources, max_docs=a.max_docs), a.repeats)
    mb = sum(len(d["text"].encode()) for d in raw) / 1e6
    ds = Dataset.from_list(raw)
    t_clean, (clean, funnel, info) = median_time(lambda: clean_corpus(ds, num_perm=a.num_perm, bands=a.bands), a.repeats)

    texts = clean["text"]
    sets = [shingles(t, 5) for t in texts]
    perms = minhash_permutations(a.num_perm)
    n_naive = min(50, len(sets))
    t_naive, _ = median_time(lambda: [minhash_naive(s, perms) for s in sets[:n_naive]], 1)
    t_ours, sigs = median_time(lambda: np.stack([minhash(s, perms) for s in sets]), a.repeats)

    def ds_minhash(scheme):
        out = []
        for s in sets:
            m = MinHash(num_perm=a.num_perm, seed=1, scheme=scheme); m.update_batch(list(s)); out.append(m.hashvalues)
        return out
    t_legacy, legacy = median_time(lambda: ds_minhash("legacy"), a.repeats)
    t_affine, _ = median_time(lambda: ds_minhash("affine32"), a.repeats)
    identical = all(np.array_equal(x.astype(np.uint32), y) for x, y in zip(legacy, sigs))
    t_lsh, pairs = median_time(lambda: near_duplicate_pairs(sigs, a.bands, tiny["jaccard"]), a.repeats)
    t_eval, ev = median_time(lambda: dedup_eval(texts, n_planted=min(200, len(texts)), num_perm=a.num_perm, bands=a.bands), 1)

    print(json.dumps(dict(
        machine=dict(python=platform.python_version(), cpus=os.cpu_count(), processor=platform.processor()),
        corpus=dict(sources=a.sources, raw_docs=len(raw), raw_mb=round(mb, 2), clean_docs=len(clean),
                    funnel=[(s["step"], s["docs"]) for s in funnel.steps]),
        collect_s=round(t_collect, 2),
        cleaning=dict(seconds=round(t_clean, 2), docs_per_s=round(len(raw) / t_clean, 1), mb_per_s=round(mb / t_clean, 3)),
        minhash_docs_per_s=dict(naive_python=round(n_naive / t_naive, 1), ours_numpy=round(len(sets) / t_ours, 1),
                                datasketch_legacy=round(len(sets) / t_legacy, 1),
                                datasketch_affine32=round(len(sets) / t_affine, 1)),
        minhash_speedup_vs_naive=round((t_naive / n_naive) / (t_ours / len(sets)), 1),
        signatures_identical_to_datasketch_legacy=identical,
        lsh_seconds=round(t_lsh, 4), lsh_pairs_in_clean_corpus=len(pairs),
        planted_dedup=dict(**ev, seconds=round(t_eval, 2))), indent=2))


if __name__ == "__main__":
    main()
