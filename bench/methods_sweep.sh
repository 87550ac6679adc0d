#!/usr/bin/env bash
# The methods benchmark: every phase is a resumable `kvplug eval run` (rerun this script to continue after an
# interruption; finished rows are skipped), then the reports. Phases in priority order: the headline (ratio 0.5,
# every method, 100 samples per task and length) at 1K, 2K, 4K on SmolLM2; other ratios at 1K on fewer samples;
# the query-agnostic setting; Gemma-3. Each phase's wall time goes to bench-results/sweep-times.log.
# Usage: bench/methods_sweep.sh [phase ...]   (default: all; phases: s1k s2k s4k ratios agnostic gemma report)
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
RUN=(nice -n 5 .venv/bin/kvplug eval run --threads "${OMP_NUM_THREADS}")
OUT=bench-results
mkdir -p "$OUT"
# Every method of the headline; at 1K also the unpooled Scissorhands and the ungated MiniCache (root causes e, f).
M="streamingllm,h2o,h2o?normalize=true,snapkv,snapkv?window_size=64&kernel_size=5&pooling=avg,pyramidkv,tova"
M="$M,scissorhands,cake,knorm,keydiff,expectedattention,kvzip,random,razorattention,think,kivi,kivi?bits=4,kvquant"
M="$M,int8,snapkv+kivi"
M1K="$M,scissorhands?kernel_size=1,minicache?min_similarity=-1"
SMOL=$OUT/methods-smollm2.jsonl
AGN=$OUT/methods-smollm2-agnostic.jsonl
GEM=$OUT/methods-gemma3.jsonl
phase() {
  local name=$1; shift
  local t0=$SECONDS
  echo "$(date -Is) start $name" >> "$OUT/sweep-times.log"
  "$@"
  echo "$(date -Is) done $name $((SECONDS - t0)) s" >> "$OUT/sweep-times.log"
}
phases=("$@")
[ ${#phases[@]} -eq 0 ] && phases=(s1k s2k s4k ratios agnostic gemma report)
for p in "${phases[@]}"; do
  case $p in
    s1k) phase s1k "${RUN[@]}" --model smollm2 --methods "$M1K" --ratios 0.5 --lengths 1024 --samples 100 \
           --results "$SMOL" ;;
    s2k) phase s2k "${RUN[@]}" --model smollm2 --methods "$M" --ratios 0.5 --lengths 2048 --samples 100 \
           --results "$SMOL" ;;
    s4k) phase s4k "${RUN[@]}" --model smollm2 --methods "$M" --ratios 0.5 --lengths 4096 --samples 100 \
           --results "$SMOL" ;;
    ratios) phase ratios "${RUN[@]}" --model smollm2 --methods "$M" --ratios 0.25,0.75,0.875 --lengths 1024 \
              --samples 25 --tasks needle,qa --results "$SMOL" ;;
    agnostic) phase agnostic "${RUN[@]}" --model smollm2 --methods "$M" --query-agnostic --ratios 0.5 \
                --lengths 1024 --samples 50 --tasks needle,qa --results "$AGN" ;;
    gemma) phase gemma "${RUN[@]}" --model gemma3 --methods "$M" --ratios 0.5 --lengths 1024 --samples 50 \
             --tasks needle,qa,ppl --ppl-samples 10 --results "$GEM" ;;
    report)
      .venv/bin/kvplug eval report --model smollm2 --results "$SMOL" --out docs/results \
        --command "bench/methods_sweep.sh s1k s2k s4k ratios"
      .venv/bin/kvplug eval report --model smollm2 --results "$AGN" --out docs/results/query-agnostic \
        --command "bench/methods_sweep.sh agnostic"
      .venv/bin/kvplug eval report --model gemma3 --results "$GEM" --out docs/results --command "bench/methods_sweep.sh gemma"
      ;;
    *) echo "unknown phase $p" >&2; exit 2 ;;
  esac
done
