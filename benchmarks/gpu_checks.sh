#!/usr/bin/env bash
# The checks that need a CUDA GPU (issue 4), for a machine that has one; an H100 for the MFU goal (>= 45 %).
# Each part fits in one 10-minute call of the device tool; results are written under OUT (default: gpu-checks/).
#
#   bash benchmarks/gpu_checks.sh tests       # pytest -m gpu: compiled bf16 model and training loop on CUDA
#   bash benchmarks/gpu_checks.sh data        # stages 01-04 on the gpu preset (corpus, 32k tokenizer, encoding, model)
#   bash benchmarks/gpu_checks.sh pretrain    # stage 05 on the gpu preset: 124M params, bf16, compiled, fused AdamW
#   bash benchmarks/gpu_checks.sh generation  # stage 06 on the gpu preset
#   bash benchmarks/gpu_checks.sh bench       # benchmarks/pretrain.py --gpu (tokens/s, MFU) and generation.py on CUDA
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
OUT=${OUT:-gpu-checks}
RUN="$OUT/run"
case "${1:-}" in tests|data|pretrain|generation|bench) ;; *) echo "usage: bash benchmarks/gpu_checks.sh tests|data|pretrain|generation|bench" >&2; exit 2 ;; esac
command -v nvidia-smi >/dev/null || { echo "no NVIDIA GPU on this machine (nvidia-smi not found)" >&2; exit 1; }
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
case "${1:-}" in
  tests)      pytest -q -p no:cacheprovider -m gpu tests/ 2>&1 | tee "$OUT/pytest-gpu.txt" ;;
  data)       llm-lifecycle run --preset gpu --run-dir "$RUN" --to 04 --no-progress 2>&1 | tee "$OUT/stages-01-04.txt" ;;
  pretrain)   llm-lifecycle run --preset gpu --run-dir "$RUN" --from 05 --to 05 --no-progress 2>&1 | tee "$OUT/stage-05.txt"
              python -c "import json,sys; m=json.load(open(sys.argv[1])); r=m['results']; print(json.dumps({**{k: r[k] for k in ('val_bpb', 'unigram_val_bpb', 'test_bpb', 'steps', 'epochs', 'tokens_per_s', 'mfu', 'mfu_peak', 'train_s')}, 'seconds': m['seconds']}, indent=1))" "$RUN/base/metrics.json" | tee "$OUT/stage-05-metrics.json" ;;
  generation) llm-lifecycle run --preset gpu --run-dir "$RUN" --from 06 --to 06 --no-progress 2>&1 | tee "$OUT/stage-06.txt" ;;
  bench)      python benchmarks/pretrain.py --run-dir "$RUN" --gpu --seconds 60 --repeats 3 | tee "$OUT/pretrain.json"
              python benchmarks/generation.py --preset gpu --device cuda | tee "$OUT/generation.json" ;;
esac
