#!/usr/bin/env bash
# The GPU checks and timings in one go, capped at 12 minutes in all (about 9 expected on one H200):
#   1. the compile and amp switches give the plain losses and gradients with this GPU's kernels (tests);
#   2. benchmarks/bench.py on the GPU, with the joint step under compile, amp and both (what each buys);
#   3. a full default dense MNIST run (three phases, 56,950 steps, final evaluation), wall-clock timed;
#   4. sweep packing: one `quick` run alone, then 4 and 8 sharing the GPU through sweep.py (runs per hour).
# The conv run's time is the bench's conv joint rate extrapolated over its 56,950 steps.
#
#   DPSOM_DATA_DIR=path/to/data bash benchmarks/gpu_check.sh [OUTPUT_FOLDER]
#   STAGES="bench sweep_pack" bash benchmarks/gpu_check.sh      # some stages only
#
# Needs requirements.txt's packages with a CUDA build of torch, under $PYTHON (default python3). Each
# stage's log lands in OUTPUT_FOLDER (default gpu_check); a stage over its cap is stopped and reported,
# and the next one still runs.
set -u -o pipefail
cd "$(dirname "$0")/.."
DATA=${DPSOM_DATA_DIR:-../shared/data}
OUT=${1:-gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

stage() {   # stage NAME CAP_SECONDS COMMAND...
    local name=$1 cap=$2
    shift 2
    local t0=$SECONDS
    timeout "$cap" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "stage $name: exit $rc after $((SECONDS - t0)) s$([ $rc = 124 ] && echo " (stopped at its cap of $cap s)")" \
        | tee -a "$OUT/summary.txt"
    tail -n 25 "$OUT/$name.log"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/summary.txt"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/summary.txt"

STAGES=${STAGES:-switches bench dense_run sweep_pack}
want() { [[ " $STAGES " == *" $1 "* ]]; }

want switches && DPSOM_TEST_DEVICE=cuda DPSOM_DATA_DIR="$DATA" stage switches 90 "$PY" -m pytest -q tests/test_speed_switches.py
want bench && stage bench 210 "$PY" benchmarks/bench.py --device cuda --data-dir "$DATA" --variants yes --default-run no
if want dense_run; then
    stage dense_run 180 "$PY" dpsom.py with data_dir="$DATA" validation=True device=cuda logdir="$OUT/dense_run"
    grep -E "^(nmi|purity)|nmi: " "$OUT/dense_run.log" | tail -n 1 | tee -a "$OUT/summary.txt"
fi
# Ray needs the machine's loopback only here, as in the tests (see README, Sweeps)
want sweep_pack && RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled \
    stage sweep_pack 240 "$PY" benchmarks/sweep_packing.py --data-dir "$DATA" --out "$OUT/sweep_pack"
