#!/usr/bin/env bash
# The one command for a GPU session, run from the repository root:
#
#     bash benchmarks/gpu_check.sh                 # every stage, about 6 minutes on an H200
#     STAGES="flex pytest-gpu" bash benchmarks/gpu_check.sh   # a rerun of some stages
#
# It measures first and stays under BUDGET (340 s) of stage time, so that a session of 15
# minutes of device time holds one full run, the machine's start and a rerun of the stages
# that need it. Stages, most valuable first, each under its own time limit (SIGINT at the
# limit, so Python and pytest still report; SIGKILL 10 s later) and never past the budget;
# a stage that runs over is reported TIMED OUT and the next one starts:
#   1. timings: rel-pos attention forward+backward at MAT stage 1, batch 64, bf16 against
#      eager with the materialised bias, SDPA with an attn_mask bias and xformers; then the
#      AVBottleneck cases, then pooled Q/K/V (also against torch.compile of its reference);
#      then the other stages while the budget lasts. Before a case is timed, each path is
#      checked against float64 at a reduced shape (rel-pos MAT stage 1: q grid 4 x 128 over
#      k grid 2 x 64) with the kernel tests' rule: max error <= 2 x PyTorch's own max error
#      in bf16 + a few ulp. A path that fails is not timed and the JSON says why.
#      -> kernels.json, kernels.png
#   2. flex: the torch.compile'd paths on their own: FlexAttention (a score_mod with the
#      captured bias) at rel-pos MAT stage 1 and the bottleneck, then pooled Q/K/V's compiled
#      reference. Their cold compiles (Inductor: tens of seconds to minutes) cannot eat the
#      timings' budget: the stage has its own limit, and when it runs over it is reported
#      TIMED OUT and the rest is skipped. What it did time is merged into kernels.json
#      (python -m benchmarks.kernels --merge), where the targets against FlexAttention are
#      evaluated.
#   3. pytest-gpu: every test marked gpu that CUDA makes run: the kernels' GPU tests
#      (tests/test_relpos_attention.py, test_pooled_qkv.py, test_bottleneck_attention.py,
#      test_kernel_runtime_checks.py: real launches with batch x heads = 70000),
#      the memory estimator against a measured CUDA peak (tests/test_plan.py) and the
#      autocast policy against torch's CUDA autocast (tests/test_memory_precision.py).
#   4. train-memory: one MAT training step at batch 64, MMT_FAST_KERNELS=reference vs
#      triton.  -> kernels_train_memory.json
#   5. pytest-cuda: the kernel tests not marked gpu, which switch to CUDA when it is there
#      (the README's `pytest` on a GPU machine), and tests/test_kernels_in_models.py; in what
#      is left of the budget.
#   6. flops-memory: benchmarks.flops_memory --device cuda, in what is left, when fvcore
#      imports.
#   7. step: one whole training step of MAT, MViTv2-B and MMT timed (eager, selective,
#      torch.compile) with torch.profiler per category (benchmarks.step_gpu), in what is
#      left.  -> step_gpu.json, beside the step model's step_model.json
# The kernels run with MMT_FAST_KERNEL_CONFIGS=pinned (one config per kernel, chosen by
# the compile gate; no autotuning). The compile time that costs is printed first, read
# from benchmarks/results/compile_gate.json when the compile gate has written it.
#
# Packages the GPU image lacks are carried as wheels in .whl/ (name .whl in the device
# call's carry); they are installed below, without dependencies, when present:
#     pip wheel -q --no-deps -w .whl fvcore==0.1.5.post20221221 iopath==0.1.10 yacs==0.1.8 termcolor==3.3.0
#     pip download -q --no-deps --only-binary :all: --python-version 3.12 \
#         --platform manylinux_2_28_x86_64 -d .whl xformers==0.0.35
# (xformers 0.0.35 declares torch>=2.10, so it leaves torch 2.11 in place; its own CUDA
# extension is built for torch 2.10 and does not load beside 2.11, so
# memory_efficient_attention runs PyTorch's CUTLASS kernel, "cutlassF-pt": see docs/benchmarks.md.)
# Output goes to $OUT (the device tool's folder) or benchmarks/results/; the full log
# is $OUT/gpu_check.log. A summary of the stages is printed last.
set -u

OUT="${OUT:-benchmarks/results}"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}."
# The project, editable: mmt_fast.kernels is the folder kernels/ (pyproject.toml maps the
# name onto it; docs/design.md, "Layers"), which only an install provides when Python runs
# from the repository root. Into a venv that sees the image's packages; setuptools>=77 for
# the build comes from .whl when the image lacks it:
#     pip download -q --no-deps -d .whl setuptools==80.9.0
if ! "${PYTHON:-python3}" -c "import mmt_fast.kernels" >/dev/null 2>&1; then
    python3 -m venv --system-site-packages --without-pip /tmp/mmt-venv &&
        python3 -m pip --python /tmp/mmt-venv/bin/python install -q --no-index --no-deps \
            --no-build-isolation -e . && PYTHON=/tmp/mmt-venv/bin/python
fi
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONWARNINGS="ignore::UserWarning"
export MMT_FAST_KERNEL_CONFIGS="${MMT_FAST_KERNEL_CONFIGS:-pinned}"
LOG="$OUT/gpu_check.log"
: >"$LOG"
declare -a SUMMARY=()
T0=$SECONDS
BUDGET=${BUDGET:-340}  # seconds for all stages (the header and the summary aside)
STAGES=${STAGES:-"timings flex pytest-gpu train-memory pytest-cuda flops-memory step"}
RC_LAST=0

wanted() { [[ " $STAGES " == *" $1 "* ]]; }

skip() {  # skip NAME WHY
    echo "=== [$1] skipped: $2" | tee -a "$LOG"
    SUMMARY+=("$(printf '%-14s %-24s %4ss' "$1" "skipped ($2)" 0)")
}

stage() {  # stage NAME SECONDS MIN_SECONDS COMMAND...: at most SECONDS, never past the budget
    local name=$1 limit=$2 least=$3
    shift 3
    RC_LAST=1
    if ! wanted "$name"; then
        return
    fi
    local left=$((BUDGET - (SECONDS - T0)))
    if [ "$left" -lt "$least" ]; then
        skip "$name" "${left}s of the budget left"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    local t=$SECONDS
    echo "=== [$name] (limit ${limit}s, at $((SECONDS - T0))s): $*" | tee -a "$LOG"
    timeout -s INT -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    RC_LAST=$rc
    local what="ok"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        what="TIMED OUT"
    elif [ "$rc" -ne 0 ]; then
        what="FAILED (rc=$rc)"
    fi
    SUMMARY+=("$(printf '%-14s %-24s %4ss' "$name" "$what" "$((SECONDS - t))")")
}

{
    echo "gpu_check: $(date -u +%FT%TZ) out=$OUT MMT_FAST_KERNEL_CONFIGS=$MMT_FAST_KERNEL_CONFIGS"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
        --format=csv 2>&1 || true
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name())"
    "$PY" -c "import xformers.ops, xformers; print('xformers', xformers.__version__)" 2>&1 |
        tail -1 || true
    "$PY" -m benchmarks.kernels --compile-estimate benchmarks/results/compile_gate.json
} 2>&1 | tee -a "$LOG"

# 1. Timings, most valuable case first, FlexAttention aside (stage 2). The JSON is rewritten
#    after every path and no case is started after --budget-s, so a timeout keeps what was
#    measured.
stage timings 120 60 "$PY" -m benchmarks.kernels --out "$OUT" --budget-s 80 \
    --paths fused reference sdpa xformers --cases \
    relpos/mat_s1 bottleneck/mmt_audio bottleneck/mmt_video pooled/mat_s1 pooled/video_s1 \
    relpos/mat_s2 relpos/video_s1 pooled/mat_s2 relpos/mat_s3 relpos/mat_s4 relpos/video_s2

# 2. The compiled paths, bounded; what they timed is merged into kernels.json.
stage flex 100 45 "$PY" -m benchmarks.kernels --out "$OUT/flex" --budget-s 60 \
    --paths flex compiled --cases relpos/mat_s1 bottleneck/mmt_audio pooled/mat_s1
if [ -f "$OUT/kernels.json" ] && [ -f "$OUT/flex/kernels.json" ]; then
    "$PY" -m benchmarks.kernels --merge "$OUT/kernels.json" "$OUT/flex/kernels.json" 2>&1 |
        tee -a "$LOG"
elif wanted flex; then
    echo "=== [flex] nothing to merge: no compiled path was timed" | tee -a "$LOG"
fi
if [ -f "$OUT/kernels.json" ]; then
    "$PY" -m benchmarks.kernels --replot "$OUT/kernels.json" >>"$LOG" 2>&1 || true
fi

# 3. Every gpu-marked test (the data tests, which need decord, have none).
stage pytest-gpu 70 30 "$PY" -m pytest -q -m gpu -p no:cacheprovider -rfEs \
    tests/test_relpos_attention.py tests/test_pooled_qkv.py \
    tests/test_bottleneck_attention.py tests/test_kernels_in_models.py \
    tests/test_kernel_runtime_checks.py tests/test_plan.py tests/test_memory_precision.py

# 4. MAT training-step memory, MMT_FAST_KERNELS=reference vs triton.
stage train-memory 50 30 "$PY" -m benchmarks.kernels --train-memory --out "$OUT"

# 5. The kernel tests not marked gpu, on CUDA (the README's pytest on a GPU machine).
stage pytest-cuda 90 30 "$PY" -m pytest -q -m "not gpu" -p no:cacheprovider -rfEs \
    tests/test_relpos_attention.py tests/test_pooled_qkv.py \
    tests/test_bottleneck_attention.py tests/test_kernels_in_models.py \
    tests/test_kernel_runtime_checks.py

# 6. The paper's FLOPs/memory table, memory measured on the GPU. Needs fvcore, which
#    the H200 image lacks (carry .whl, see the top); runs in whatever is left.
if wanted flops-memory && ! "$PY" -c "import fvcore" >/dev/null 2>&1; then
    skip flops-memory "fvcore does not import here (carry .whl)"
else
    stage flops-memory 120 40 "$PY" -m benchmarks.flops_memory --device cuda \
        --json "$OUT/flops_memory.json" --plot "$OUT/memory_vs_batch.png"
fi

# 7. The whole training step (eager, selective, compile), in whatever is left.
stage step 120 40 "$PY" -m benchmarks.step_gpu --out "$OUT" --budget-s 80

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
