#!/usr/bin/env bash
# Everything a GPU should check and time, in one script that fits 10 minutes and can be run again:
#   env         the GPU, its driver, torch and CUDA
#   switches    compile and amp give the plain losses and gradients with this GPU's kernels (tests)
#   gpu_path    every phase, evaluate, assign and resume, within the GPU and across GPU and CPU (tests)
#   bench       benchmarks/bench.py: each phase against a bare step; the joint step under compile, amp, both
#   dense_run   a full default dense MNIST run (three phases, 56,950 steps, evaluation), wall-clock timed
#   sweep_pack  benchmarks/sweep_packing.py: 1, 4 and 8 short runs sharing the GPU through sweep.py (needs Ray)
#   dense_amp   the full dense run with amp=True
#
#   bash benchmarks/gpu_check.sh [OUT]                         # on a machine with a CUDA GPU (OUT: gpu_check)
#   GPU_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh OUT      # the rehearsal: every stage on the CPU, tiny sizes
#   STAGES="bench dense_run" bash benchmarks/gpu_check.sh      # some stages only
#
# Data: DPSOM_DATA_DIR, else data/ in this tree (where dpsom.py downloads MNIST), else ../shared/data beside it.
# A machine without internet needs the IDX files brought along: copy mnist/ (and fashion-mnist/) into data/
# and send that folder with the tree. Python: $PYTHON (default python3) with requirements.txt's packages and a
# CUDA build of torch; sweep_pack is skipped, saying so, where Ray is missing.
# Time: GPU_CHECK_BUDGET seconds in all (default 540; a stage stopped at its cap has 30 s more to checkpoint). Each stage stops at its own cap or at the time left,
# whichever comes first (stopped: exit 124 in OUT/summary.txt), and the next stage still runs. A stage that
# ended with exit 0 leaves OUT/<stage>.done and is skipped when the script runs again in the same OUT
# (FORCE=1 runs it again); a full run stopped at its cap continues from its checkpoint on the next call.
set -u -o pipefail
cd "$(dirname "$0")/.."
DEVICE=${GPU_CHECK_DEVICE:-cuda}
OUT=${1:-gpu_check}
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-540}
export PYTHONUNBUFFERED=1 DPSOM_REQUIRE_FIXTURES=1      # a test without its data fails, never skips
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

DATA=${DPSOM_DATA_DIR:-}
if [ -z "$DATA" ]; then
    for d in data ../shared/data; do [ -e "$d/mnist" ] && DATA=$d && break; done
fi
if [ -z "$DATA" ] || [ ! -e "$DATA/mnist" ]; then
    echo "gpu_check: no MNIST here (DPSOM_DATA_DIR, data/, ../shared/data): copy the mnist/ IDX files into data/" \
         "of this tree (without internet, bring them along with it), or set DPSOM_DATA_DIR" >&2
    exit 2
fi
DATA=$(cd "$DATA" && pwd)
# every stage but env needs the project's packages: say which are missing before any stage runs
if ! missing=$("$PY" -c "
import importlib.util as u
names = ['torch', 'numpy', 'sklearn', 'scipy', 'sacred', 'pkg_resources', 'tqdm', 'tensorboard', 'h5py', 'psutil', 'pytest']
print(' '.join(n for n in names if u.find_spec(n) is None))") || [ -n "$missing" ]; then
    echo "gpu_check: $PY lacks ${missing:-a working Python}: pip install -r requirements.txt (pkg_resources is" \
         "setuptools<81's; Sacred imports it); without internet, pip install --no-index --target DIR the wheels" \
         "brought along and set PYTHONPATH=DIR" >&2
    exit 2
fi

if [ "$DEVICE" = cpu ]; then   # the rehearsal: the same stages and commands at sizes of seconds
    TINY="max_train_samples=600 batch_size=100 epochs_pretrain=1 som_epochs=1 som_learning_rates=[0.9,0.1]
          num_epochs=2 latent_dim=10 max_eval_samples=500 log_every=3"
    SWITCH_TESTS=(--collect-only)    # the test suite runs these on the CPU (and the GPU path on its stand-in);
    PATH_TESTS=(--collect-only)      # the rehearsal checks that the stages find, import and select them
    BENCH=(--device cpu --arch dense --rounds 1 --samples 1200 --default-run no --variants no)
    RUN=($TINY)
    PACK=(--device cpu --packs 2 $TINY)
    CAPS="env=30 switches=120 gpu_path=120 bench=120 dense_run=120 sweep_pack=180 dense_amp=120"
else
    SWITCH_TESTS=()
    PATH_TESTS=()
    BENCH=(--device "$DEVICE" --variants yes --default-run no)
    RUN=()
    PACK=(--device cuda)
    # measured work, not guesses, where a GPU has run it (docs: the GPU section); the full runs take what is left
    CAPS="env=30 switches=120 gpu_path=150 bench=150 dense_run=420 sweep_pack=240 dense_amp=420"
fi
START=$SECONDS

cap_of() { local kv; for kv in $CAPS; do [ "${kv%%=*}" = "$1" ] && echo "${kv#*=}"; done; }

stage() {   # stage NAME COMMAND...: run it into OUT/NAME.log under its cap and the time left
    local name=$1
    shift
    if [ -e "$OUT/$name.done" ] && [ "${FORCE:-0}" != 1 ]; then
        echo "stage $name: done in an earlier call (FORCE=1 runs it again)" | tee -a "$OUT/summary.txt"
        return
    fi
    local left=$((BUDGET - (SECONDS - START))) cap
    cap=$(cap_of "$name")
    [ "$left" -lt "$cap" ] && cap=$left
    if [ "$cap" -lt 10 ]; then
        echo "stage $name: not started, $left s of the budget left" | tee -a "$OUT/summary.txt"
        return
    fi
    local t0=$SECONDS
    timeout -s TERM -k 30 "$cap" bash -c '"$@"' "$name" "$@" > "$OUT/$name.log" 2>&1   # TERM: runs checkpoint
    local rc=$?
    [ $rc = 0 ] && touch "$OUT/$name.done"
    echo "stage $name: exit $rc after $((SECONDS - t0)) s$([ $rc = 124 ] && echo " (stopped at its cap of $cap s)")" \
        | tee -a "$OUT/summary.txt"
    tail -n 15 "$OUT/$name.log"
}

full_run() {   # full_run NAME WORDS...: a dense MNIST run in OUT/NAME, continued from its checkpoint if it has one
    local name=$1
    shift
    if [ -e "$OUT/$name/checkpoint.pt" ]; then
        exec "$PY" dpsom.py with resume="$OUT/$name" device="$DEVICE"
    else
        exec "$PY" dpsom.py with data_dir="$DATA" validation=True device="$DEVICE" logdir="$OUT/$name" "$@"
    fi
}

environment() {
    if [ "$DEVICE" = cpu ]; then lscpu | grep -E "Model name|^CPU\(s\)"; else
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; fi
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
}

export -f full_run environment
export PY DEVICE OUT DATA
STAGES=${STAGES:-env switches gpu_path bench dense_run sweep_pack dense_amp}
want() { [[ " $STAGES " == *" $1 "* ]]; }
echo "gpu_check on $DEVICE, $(date -u +%FT%TZ), budget $BUDGET s, data $DATA" | tee -a "$OUT/summary.txt"

want env && stage env environment
want switches && DPSOM_TEST_DEVICE=$DEVICE DPSOM_DATA_DIR=$DATA \
    stage switches "$PY" -m pytest -q -x tests/test_speed_switches.py "${SWITCH_TESTS[@]}"
want gpu_path && DPSOM_TEST_DEVICE=$([ "$DEVICE" = cpu ] && echo fakegpu || echo "$DEVICE") DPSOM_DATA_DIR=$DATA \
    stage gpu_path "$PY" -m pytest -q -x tests/test_gpu_path.py "${PATH_TESTS[@]}"
want bench && stage bench "$PY" benchmarks/bench.py "${BENCH[@]}"
if want dense_run; then
    stage dense_run full_run dense_run "${RUN[@]}"
    grep -E "^nmi: " "$OUT/dense_run.log" | tail -n 1 | tee -a "$OUT/summary.txt"
fi
if want sweep_pack; then
    if "$PY" -c "import ray" 2>/dev/null; then   # Ray on this machine's loopback only, as in the tests
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled \
            stage sweep_pack "$PY" benchmarks/sweep_packing.py --data-dir "$DATA" --out "$OUT/sweep_pack" "${PACK[@]}"
        grep -E "completed" "$OUT/sweep_pack.log" | tee -a "$OUT/summary.txt"
    else
        echo "stage sweep_pack: skipped, Ray is not installed for $PY" | tee -a "$OUT/summary.txt"
    fi
fi
if want dense_amp; then
    stage dense_amp full_run dense_amp amp=True "${RUN[@]}"
    grep -E "^nmi: " "$OUT/dense_amp.log" | tail -n 1 | tee -a "$OUT/summary.txt"
fi
echo "gpu_check: $((SECONDS - START)) s; $OUT/summary.txt" | tee -a "$OUT/summary.txt"
