#!/usr/bin/env bash
# One-shot check on a CUDA GPU, in under 9 minutes (the phases' time limits add up to 540 s):
#   1. pytest tests/kernels natively on CUDA (no TRITON_INTERPRET: compiled kernels, CUDA tensors),
#      including the AOT compile and budget tests on their default set (the full static audit needs
#      no GPU: benchmarks/kernel_audit.py on any machine), and the CUDA test of the PyTorch path's
#      fused log-sum-exp attention;
#   2. benchmarks/bench_attention.py --quick (prefill TFLOP/s, decode GB/s vs copy bandwidth);
#   3. benchmarks/gpu_model_check.py: a Llama-3-8B-shaped model (random bf16 weights from a config),
#      4k-token prefill and 128 decode steps, stock SDPA vs patched, eager and compiled; and live
#      telemetry (sinkfix.monitor on the Triton kernels' statistics variants) on vs off, prefill and
#      decode step, against its targets (1.03x / 1.05x);
#   4. benchmarks/kernel_audit.py --native: the audited bf16 configurations timed with real launches,
#      to set next to their static numbers (registers, spills, main-loop SASS);
#   5. benchmarks/bench_content_sinks.py --backend triton: content-dependent sinks vs the positional
#      policy per attention call (bf16), the GPU counterpart of the CPU table in docs/content_sinks.md.
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

# --confcutdir keeps pytest from loading tests/conftest.py (tiny transformers models, not needed here)
timeout 150 "$PYTHON" -m pytest tests/kernels tests/test_cuda_path.py -q -rfE -s --confcutdir=tests/kernels \
    --durations=15 --junitxml="$OUT/pytest-kernels.xml" > "$OUT/pytest-kernels.txt" 2>&1
tests_rc=$?

timeout 90 "$PYTHON" benchmarks/bench_attention.py --quick --out "$OUT/bench.md" > "$OUT/bench.log" 2>&1
bench_rc=$?

# modes in this order: eager, then telemetry (short), then the compiled mode, whose compilation is
# the longest phase; a mode starting after the budget is reported as skipped
timeout 180 "$PYTHON" benchmarks/gpu_model_check.py --budget 130 --modes eager,monitored,compiled \
    --out "$OUT/model.md" > "$OUT/model.log" 2>&1
model_rc=$?

# JIT compiles dominate (about 22 configurations); no case starts after 40 s, partial table kept
timeout 60 "$PYTHON" benchmarks/kernel_audit.py --native --deadline 40 --markdown "$OUT/audit-native.md" \
    --out "$OUT/audit" > "$OUT/audit-native.log" 2>&1
native_rc=$?

timeout 60 "$PYTHON" benchmarks/bench_content_sinks.py --backend triton --dtype bf16 --lengths 2048 8192 \
    --repeats 10 > "$OUT/content-sinks.md" 2>&1
content_rc=$?

{
    echo "pytest tests/kernels exit code: $tests_rc (124 = timed out)"
    tail -n 8 "$OUT/pytest-kernels.txt"
    echo "benchmark exit code: $bench_rc (124 = timed out; partial table kept in bench.md)"
    echo "model check exit code: $model_rc (124 = timed out; phases printed in model.log as they finish)"
    cat "$OUT/model.md" 2>/dev/null
    echo "native audit exit code: $native_rc (124 = timed out; partial table kept in audit-native.md)"
    echo "content-sink benchmark exit code: $content_rc (124 = timed out)"
    cat "$OUT/content-sinks.md" 2>/dev/null
    echo "wall time: $(( $(date +%s) - start )) s"
} | tee "$OUT/summary.txt"

[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$model_rc" -eq 0 ] && [ "$native_rc" -eq 0 ] && [ "$content_rc" -eq 0 ]
