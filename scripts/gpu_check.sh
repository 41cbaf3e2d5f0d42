#!/usr/bin/env bash
# The figures a GPU user needs, in one run (under 10 minutes on one GPU):
# PPO env steps/s on Breakout-MinAtar with 1, 64 and 256 vmapped members,
# OPEN / K-FAC / diag_ggn cost ratios against Adam, one ES generation of
# population 64, PPO on brax/ant; beside purejaxrl's PPO when a checkout is
# given (PUREJAXRL=path/to/purejaxrl/purejaxrl; the GPU machine cannot
# download it). Every figure is a line "FIGURE name = value unit"
# (meta/gpu_check.py says what each one measures).
#
#   scripts/gpu_check.sh                      # full sizes, on the GPU
#   TINY=1 scripts/gpu_check.sh               # tiny sizes: a CPU smoke test (tests/test_gpu_check.py)
#   scripts/gpu_check.sh --skip brax          # further flags go to meta/gpu_check.py (--help)
#
# PYTHON picks the interpreter (default: python on PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
args=()
if [ "${TINY:-0}" = "1" ]; then args+=(--tiny); fi
start=$(date +%s)
"$PY" -m meta.gpu_check "${args[@]}" "$@"
if [ -n "${PUREJAXRL:-}" ]; then
  if [ "${TINY:-0}" = "1" ]; then steps=4096; seeds=1; else steps=2e6; seeds=1,64; fi
  "$PY" scripts/compare_purejaxrl.py --purejaxrl "$PUREJAXRL" --env Breakout-MinAtar --timesteps "$steps" \
    --seeds "$seeds"
else
  echo "purejaxrl: not compared (set PUREJAXRL=path/to/purejaxrl/purejaxrl, the folder holding ppo.py)"
fi
echo "gpu_check: done in $(( $(date +%s) - start )) s"
