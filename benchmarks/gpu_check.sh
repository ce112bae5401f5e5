#!/usr/bin/env bash
# The one command for a GPU session, run from the repository root:
#
#     bash benchmarks/gpu_check.sh
#
# Stages, each under its own time limit so one failure or hang does not lose the
# others' results (the whole script stays under about 8 minutes on an H200):
#   1. pytest -m gpu: the kernels' GPU tests (bf16/fp16/fp32 against float64)
#   2. benchmarks.kernels --check: every benchmark path against float64, reduced size
#   3. benchmarks.kernels: timings and memory at the real shapes -> kernels.json, kernels.png
#   4. benchmarks.kernels --train-memory: MAT training step, reference vs triton
#   5. benchmarks.flops_memory --device cuda (skipped when fvcore does not import)
# fvcore (stage 5) is not on the GPU image; build its pure-Python wheels here first,
#     pip wheel -q --no-deps -w .whl fvcore==0.1.5.post20221221 iopath==0.1.10 yacs==0.1.8 termcolor==3.3.0
# and name .whl in the device call's carry: they are installed below when present.
# Output goes to $OUT (the device tool's folder) or benchmarks/results/; the full log
# is $OUT/gpu_check.log. A summary of the stages is printed last.
set -u

OUT="${OUT:-benchmarks/results}"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}."
export PYTHONUNBUFFERED=1
export PYTHONWARNINGS="ignore::UserWarning"
LOG="$OUT/gpu_check.log"
: >"$LOG"
declare -a SUMMARY=()
T0=$SECONDS

stage() {  # stage NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    local t=$SECONDS
    echo "=== [$name] (limit ${limit}s): $*" | tee -a "$LOG"
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    local what="ok"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        what="TIMED OUT"
    elif [ "$rc" -ne 0 ]; then
        what="FAILED (rc=$rc)"
    fi
    SUMMARY+=("$(printf '%-14s %-16s %4ss' "$name" "$what" "$((SECONDS - t))")")
}

{
    echo "gpu_check: $(date -u +%FT%TZ) out=$OUT"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
        --format=csv 2>&1 || true
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name())"
} 2>&1 | tee -a "$LOG"

# 1. Kernel GPU tests. Test files that import a missing package (decord, av, fvcore)
#    fail to collect; the others still run.
stage pytest-gpu 90 "$PY" -m pytest -q -m gpu tests -p no:cacheprovider \
    --continue-on-collection-errors -rfEs

# 2. Every benchmark path against a float64 reference (bf16, a few hundred tokens).
stage check 80 "$PY" -m benchmarks.kernels --check

# 3. Timings at the real shapes; the JSON is rewritten after every case, and cases
#    are not started after the budget, so a timeout keeps what was measured.
stage timings 190 "$PY" -m benchmarks.kernels --out "$OUT" --budget-s 140
if [ -f "$OUT/kernels.json" ] && [ ! -f "$OUT/kernels.png" ]; then
    stage replot 30 "$PY" -m benchmarks.kernels --replot "$OUT/kernels.json"
fi

# 4. MAT training-step memory, MMT_FAST_KERNELS=reference vs triton.
stage train-memory 120 "$PY" -m benchmarks.kernels --train-memory --out "$OUT"

# 5. The paper's FLOPs/memory table, memory measured on the GPU. Needs fvcore, which
#    the H200 image lacks (carry .whl, see the top); runs in whatever is left of 470 s.
REMAINING=$((470 - (SECONDS - T0)))
if ! "$PY" -c "import fvcore" >/dev/null 2>&1; then
    echo "=== [flops-memory] skipped: fvcore does not import here (carry .whl)" | tee -a "$LOG"
    SUMMARY+=("$(printf '%-14s %-16s %4ss' flops-memory "skipped (fvcore)" 0)")
elif [ "$REMAINING" -lt 40 ]; then
    echo "=== [flops-memory] skipped: only ${REMAINING}s left of the 8-minute budget" | tee -a "$LOG"
    SUMMARY+=("$(printf '%-14s %-16s %4ss' flops-memory "skipped (time)" 0)")
else
    stage flops-memory "$REMAINING" "$PY" -m benchmarks.flops_memory --device cuda \
        --json "$OUT/flops_memory.json" --plot "$OUT/memory_vs_batch.png"
fi

if [ -f "$OUT/kernels.json" ]; then
    "$PY" -m benchmarks.kernels --summary "$OUT/kernels.json" 2>&1 | tee -a "$LOG"
fi
if [ -f "$OUT/kernels_train_memory.json" ]; then
    "$PY" -m benchmarks.kernels --summary "$OUT/kernels_train_memory.json" 2>&1 | tee -a "$LOG"
fi
{
    echo
    echo "=== summary ($((SECONDS - T0)) s)"
    printf '%s\n' "${SUMMARY[@]}"
    echo "files in $OUT:"
    ls -l "$OUT"
} 2>&1 | tee -a "$LOG"
