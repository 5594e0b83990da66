#!/usr/bin/env bash
# One-shot check on a CUDA GPU, inside a budget of GPU_CHECK_BUDGET seconds (default 540), phases in
# order of what they settle, each under its own time limit cut to what is left of the budget:
#   1. benchmarks/gpu_model_check.py --modes monitored,eager: a Llama-3-8B-shaped model (random bf16
#      weights from a config), live telemetry (sinkfix.monitor on the Triton kernels' statistics
#      variants) on vs off, prefill and decode step, against its targets (1.03x / 1.05x); then stock
#      SDPA vs patched, 4k-token prefill and 128 decode steps;
#   1b. benchmarks/bench_host_overhead.py: host time of one batch-1 decode attention call (sinkfix's
#      Triton path with real launches, torch's SDPA beside it) and cProfile's top entries, to say where
#      the patched decode step's extra host time goes;
#   1c. gpu_model_check.py --modes profile: whole decode steps of the same model profiled per variant
#      (Python functions' own time, kernel launches, torch operations per step), what the patched
#      variants add against stock: the part of the step's extra time that is not in one attention call;
#   2. pytest tests/kernels natively on CUDA (no TRITON_INTERPRET: compiled kernels, CUDA tensors,
#      CUDA graphs) and the CUDA test of the PyTorch path's fused log-sum-exp attention; the AOT
#      compile and budget tests need no GPU and are left to `make test`;
#   3. benchmarks/bench_attention.py --quick (prefill TFLOP/s, decode GB/s vs copy bandwidth);
#   4. benchmarks/bench_content_sinks.py --backend triton: content-dependent sinks vs the positional
#      policy per attention call (bf16), the GPU counterpart of the CPU table in docs/content_sinks.md;
#   5. benchmarks/kernel_audit.py --native: the audited bf16 configurations timed with real launches,
#      to set next to their static numbers (registers, spills, main-loop SASS);
#   6. gpu_model_check.py --modes compiled, only when 200 s of the budget are left (compiling an
#      8B-shaped model once per variant is the longest phase).
# Everything lands under ${OUT:-./gpu-out}. Run from anywhere; PYTHON picks the interpreter.
# Works from a plain checkout where sinkfix is not installed (a GPU machine without network); wheels
# in .whl/ (`make gpu-wheels`) are installed beside it first.
set -uo pipefail

cd "$(dirname "$0")/.."
OUT="$(mkdir -p "${OUT:-./gpu-out}" && cd "${OUT:-./gpu-out}" && pwd)"
PYTHON="${PYTHON:-python}"
unset TRITON_INTERPRET
export TRITON_DEFAULT_FP_FUSION=1

# The kernels live in kernels/ and import as sinkfix.kernels (setuptools package-dir), so a plain
# checkout on PYTHONPATH lacks sinkfix.kernels. Stage the installed layout (what the wheel holds)
# in a temporary folder and run from there: no build step, no network.
STAGE="$(mktemp -d)"
trap 'rm -rf "$STAGE"' EXIT
cp -r sinkfix tests benchmarks pyproject.toml "$STAGE/"
rm -rf "$STAGE/sinkfix/kernels"
cp -r kernels "$STAGE/sinkfix/kernels"
# Wheels carried in .whl/ (`make gpu-wheels`: a supported transformers, where the machine's own
# is older) go to a folder of their own, ahead of the interpreter's site-packages.
SITE=""
if compgen -G ".whl/*.whl" > /dev/null; then
    SITE="$STAGE/site"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl \
        || { echo "could not install the wheels in .whl/" >&2; exit 3; }
fi
cd "$STAGE"
export PYTHONPATH="$STAGE${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}"

start=$(date +%s)
{
    date
    nvidia-smi || true
    "$PYTHON" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__); print(torch.cuda.get_device_name(0))'
    "$PYTHON" -c 'import sinkfix.kernels.attention_prefill as m; print("kernels from", m.__file__)'
    "$PYTHON" -c 'import transformers as t; print("transformers", t.__version__, "from", t.__file__)'
} > "$OUT/environment.txt" 2>&1

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "no CUDA device visible to $PYTHON: nothing to check (see $OUT/environment.txt)" | tee "$OUT/summary.txt"
    exit 2
fi

# The whole run's budget (so it fits a lease with time to spare): a phase is skipped, exit code 125,
# when less is left than it needs to be worth starting, and otherwise runs under min(its limit, left).
BUDGET="${GPU_CHECK_BUDGET:-540}"
phase() {  # phase NEED LIMIT LOGFILE COMMAND...: COMMAND's output goes to LOGFILE
    local need=$1 limit=$2 log=$3 left
    shift 3
    left=$(( BUDGET - ($(date +%s) - start) ))
    if [ "$left" -lt "$need" ]; then
        echo "skipped: ${left} s of the ${BUDGET} s budget left, ${need} s needed" | tee "$log" >> "$OUT/phases.txt"
        return 125
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "$(date +%T) $log (limit ${limit} s)" >> "$OUT/phases.txt"
    timeout "$limit" "$@" > "$log" 2>&1
}

# 1. telemetry's cost and stock vs patched, eager: the numbers no CPU run can give
phase 20 150 "$OUT/model.log" "$PYTHON" benchmarks/gpu_model_check.py --budget 100 --modes monitored,eager \
    --out "$OUT/model.md"
model_rc=$?

# 1b. where a patched decode step's host time goes (a few seconds)
phase 20 60 "$OUT/host-overhead.log" "$PYTHON" benchmarks/bench_host_overhead.py --profile 2000 \
    --json "$OUT/host-overhead.json"
host_rc=$?

# 1c. whole decode steps profiled, stock against patched (builds the model again: about a minute)
phase 30 90 "$OUT/step-profile.log" "$PYTHON" benchmarks/gpu_model_check.py --modes profile \
    --out "$OUT/step-profile.md"
step_profile_rc=$?

# 2. the kernel tests on compiled kernels and CUDA tensors. --confcutdir keeps pytest from loading
# tests/conftest.py (tiny transformers models, not needed here); the AOT compile and budget tests
# (test_compile.py, test_kernel_audit.py) need no GPU and run in `make test` on any machine. -v
# names each test as it ends, so a run stopped at its limit still says what passed. On a fresh H200
# (empty Triton cache, torch 2.11, triton 3.6) the JIT compiles made them take longer than 150 s;
# with the cache warm they took 145 s.
phase 20 300 "$OUT/pytest-kernels.txt" "$PYTHON" -m pytest tests/kernels tests/test_cuda_path.py -v -rfE -s \
    --confcutdir=tests/kernels --ignore=tests/kernels/test_compile.py --ignore=tests/kernels/test_kernel_audit.py \
    --durations=15 --junitxml="$OUT/pytest-kernels.xml"
tests_rc=$?

# 3. and 4. kernel speed against the hardware and the content-sink policy
phase 20 90 "$OUT/bench.log" "$PYTHON" benchmarks/bench_attention.py --quick --out "$OUT/bench.md"
bench_rc=$?

phase 20 60 "$OUT/content-sinks.md" "$PYTHON" benchmarks/bench_content_sinks.py --backend triton --dtype bf16 \
    --lengths 2048 8192 --repeats 10
content_rc=$?

# 5. JIT compiles dominate (about 22 configurations); no case starts after 40 s, partial table kept
phase 20 60 "$OUT/audit-native.log" "$PYTHON" benchmarks/kernel_audit.py --native --deadline 40 \
    --markdown "$OUT/audit-native.md" --out "$OUT/audit"
native_rc=$?

# 6. compiled mode last (compiling an 8B-shaped model once per variant is the longest phase); its
# table is written only when it ends, so it starts only with room to end
phase 200 240 "$OUT/model-compiled.log" "$PYTHON" benchmarks/gpu_model_check.py --modes compiled \
    --out "$OUT/model-compiled.md"
compiled_rc=$?

{
    echo "pytest tests/kernels exit code: $tests_rc (124 = timed out)"
    tail -n 8 "$OUT/pytest-kernels.txt"
    echo "benchmark exit code: $bench_rc (124 = timed out; partial table kept in bench.md)"
    echo "model check (monitored, eager) exit code: $model_rc (124 = timed out; modes printed in model.log as they finish)"
    cat "$OUT/model.md" 2>/dev/null
    echo "host overhead benchmark exit code: $host_rc (124 = timed out)"
    head -n 9 "$OUT/host-overhead.log" 2>/dev/null
    echo "decode step profile exit code: $step_profile_rc (124 = timed out)"
    cat "$OUT/step-profile.md" 2>/dev/null
    echo "native audit exit code: $native_rc (124 = timed out; partial table kept in audit-native.md)"
    echo "content-sink benchmark exit code: $content_rc (124 = timed out)"
    cat "$OUT/content-sinks.md" 2>/dev/null
    echo "model check (compiled) exit code: $compiled_rc (124 = timed out, 125 = skipped)"
    cat "$OUT/model-compiled.md" 2>/dev/null
    echo "wall time: $(( $(date +%s) - start )) s"
} | tee "$OUT/summary.txt"

[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$model_rc" -eq 0 ] && [ "$host_rc" -eq 0 ] && [ "$step_profile_rc" -eq 0 ] \
    && [ "$native_rc" -eq 0 ] \
    && [ "$content_rc" -eq 0 ] && [ "$compiled_rc" -eq 0 ]
