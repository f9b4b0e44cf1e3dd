#!/usr/bin/env bash
# One lent GPU's checks in priority order, each step under its own time limit so a slow one cannot
# starve the rest: kernel tests on the full shape lists, the U-Net step with its kernel-time profile
# (torch.compile only with UNET_COMPILE= set empty: its four builds, two layouts x two models, take
# minutes), the end-to-end pipeline, the op benchmark (per call, then as CUDA-graph replays: kernel
# time alone), the host-side cost per op call.
# Logs go to LOG (appended as they run); result files to RESULTS, re-packed into TAR after every
# step, so a run killed at its limit still returns what it finished.
#
#   bench/gpu_check.sh [LOG] [RESULTS] [TAR]     (defaults: gpu-check.log, bench/results, RESULTS.tar)
#
# STEPS picks and orders the steps (default: tests unet_step pipeline ops ops_graph host_overhead).
# Also: sweep, the Triton launch tuning; phases, where the one-read GroupNorm forward's time goes
# (bench.gn_phases); memory_floor, GroupNorm's traffic in synthetic kernels (copy, re-read at a
# distance, two passes: what each forward schedule could reach); ops_graph_knobs, the CUDA-graph op
# table with GroupNorm knobs set by GN_KNOBS (default "ONE_PASS=True"), into RESULTS/knobs/<the settings>.
# SWEEP_OP sweeps one op only, SWEEP_KNOB only the GroupNorm settings of the knobs named; TEST_FILES
# replaces the test list. Per-step limits: TESTS_LIMIT, UNET_LIMIT, PIPELINE_LIMIT, OPS_LIMIT,
# OPS_GRAPH_LIMIT, SWEEP_LIMIT, FLOOR_LIMIT, PHASES_LIMIT. UNET_CASE, UNET_STATE and UNET_IMPLS
# (comma-separated) filter U-Net rows; OPS_ARGS="--quick --no-compile" shortens the op runs;
# HBKERNELS_COMMIT names the commit in every result file where the checkout's .git is stale (a lent
# GPU's copy). The lent GPU's image lacks diffusers; its wheels travel in .whl/ (git-excluded, made in
# a fresh checkout with: echo /.whl/ >> .git/info/exclude; python3 -m pip download --no-deps
# --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1
# importlib_metadata zipp pytest-timeout), installed first by the command the results README gives.
# E.g. after a U-Net change:
#   STEPS="unet_step ops_graph tests" UNET_COMPILE= UNET_CASE=0.7b UNET_LIMIT=480 OPS_ARGS="--quick --no-compile" OPS_GRAPH_LIMIT=90 TESTS_LIMIT=120 bench/gpu_check.sh
set -u
log=${1:-gpu-check.log}
res=${2:-bench/results}
tarball=${3:-$res.tar}
mkdir -p "$res"
export PYTHONUNBUFFERED=1

failed=()
step() {
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    echo "=== $name (limit ${limit}s): $*" | tee -a "$log"
    timeout "$limit" "$@" >>"$log" 2>&1
    rc=$?
    echo "=== $name: exit $rc after $((SECONDS - t0))s" | tee -a "$log"
    [ "$rc" -eq 0 ] || failed+=("$name")
    # a new archive, then renamed over the last: a run killed while packing keeps the previous one
    tar -cf "$tarball.tmp" -C "$res" . 2>/dev/null && mv -f "$tarball.tmp" "$tarball"
}

{ date -u; echo "commit ${HBKERNELS_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} >>"$log" 2>&1

unet_impls=()
IFS=, read -ra names <<<"${UNET_IMPLS:-}"
for name in "${names[@]}"; do unet_impls+=(--impl "$name"); done

# Where installed: 8 test workers (pytest-xdist), and --timeout (pytest-timeout): a test that hangs (a
# one-pass GroupNorm group that never completes) is ended and named, and the worker's replacement runs
# the rest. Neither is a test dependency of the package: without them the tests run serially, untimed.
test_args=()
python3 -c "import xdist" 2>/dev/null && test_args+=(-n 8)
python3 -c "import pytest_timeout" 2>/dev/null && test_args+=(--timeout "${TEST_TIMEOUT:-90}")

run_step() {
    case $1 in
    tests) step tests "${TESTS_LIMIT:-110}" python3 -m pytest -q -p no:cacheprovider "${test_args[@]}" ${TEST_FILES:-tests/test_temporal_attention.py \
        tests/test_group_norm.py tests/test_layer_norm.py tests/test_layout.py tests/test_geglu.py tests/test_nn.py tests/test_backend.py \
        tests/test_compile.py tests/test_patch.py tests/test_unet.py tests/test_cuda_graph.py} ;;
    unet_step) step unet_step "${UNET_LIMIT:-120}" python3 -m bench.unet_step --quick --profile ${UNET_COMPILE---no-compile} \
        ${UNET_CASE:+--case "$UNET_CASE"} ${UNET_STATE:+--state "$UNET_STATE"} "${unet_impls[@]}" --out "$res" ;;
    pipeline) step pipeline "${PIPELINE_LIMIT:-80}" python3 -m bench.pipeline --repeats 1 --out "$res" ;;
    ops) step ops "${OPS_LIMIT:-200}" python3 -m bench ${OPS_ARGS:-} --out "$res" ;;
    ops_graph) step ops_graph "${OPS_GRAPH_LIMIT:-200}" python3 -m bench --graph ${OPS_ARGS:-} --out "$res" ;;
    host_overhead) step host_overhead 30 python3 -m bench.host_overhead --out "$res" ;;
    ops_graph_knobs) knobs_dir="$res/knobs/$(printf %s "${GN_KNOBS:-ONE_PASS=True}" | tr -cs 'A-Za-z0-9_' '-')"
        mkdir -p "$knobs_dir"  # named by the settings: two runs with other GN_KNOBS keep both tables
        step ops_graph_knobs "${OPS_GRAPH_LIMIT:-200}" python3 -c "import ast, runpy, sys
import hbkernels.triton.group_norm as gn
for knob in sys.argv[1].split():
    name, value = knob.split('=')
    assert hasattr(gn, name), name
    setattr(gn, name, ast.literal_eval(value))
sys.argv = ['bench', *sys.argv[2:]]
runpy.run_module('bench', run_name='__main__')" "${GN_KNOBS:-ONE_PASS=True}" --graph ${OPS_ARGS:-} --out "$knobs_dir" ;;
    sweep) step sweep "${SWEEP_LIMIT:-180}" python3 -m bench.sweep --quick ${SWEEP_OP:+--op "$SWEEP_OP"} ${SWEEP_KNOB:+--knob "$SWEEP_KNOB"} --out "$res" ;;
    memory_floor) step memory_floor "${FLOOR_LIMIT:-60}" python3 -m bench.memory_floor --quick --out "$res" ;;
    phases) step phases "${PHASES_LIMIT:-90}" python3 -m bench.gn_phases --out "$res" ;;
    *) echo "unknown step $1" | tee -a "$log"; failed+=("$1") ;;
    esac
}

for name in ${STEPS:-tests unet_step pipeline ops ops_graph host_overhead}; do
    run_step "$name"
done
# every step ran (a failed one does not stop the rest); the exit status says whether any failed
if [ ${#failed[@]} -gt 0 ]; then
    echo "=== failed steps: ${failed[*]}" | tee -a "$log"
    exit 1
fi
