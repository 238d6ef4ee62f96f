#!/usr/bin/env bash
# Check kbit on a machine with a real NVIDIA GPU (KBIT_REAL_GPU=1), in steps that each have a
# time limit (the default steps take about 12 minutes on an H200; a 15-minute lease fits a
# selection: KBIT_GPU_STEPS and KBIT_GPU_TEST_K below):
#   runner-tests  tests/test_runner_gpu.py: every architecture's logits on CUDA against
#                 transformers; 4-bit packed (CUDA dequantizer + GEMV) against dequantize-on-load
#                 and the CPU; decode steps replayed as CUDA graphs against the growing cache;
#   gemv-bench    benchmarks/bench_gemv_cuda.py: the CUDA GEMV kernels alone (byte layout, split-K
#                 and bit planes) against fp16 F.linear, timed inside CUDA graphs, with a
#                 launch-shape sweep;
#   bench-gpu     benchmarks/bench_gpu.py: random-weight Llama checkpoints of Llama-2-7B's layer
#                 shape (8 layers; KBIT_GPU_MODELS=small,7b8 adds SmolLM2's shape and the
#                 GPU-vs-CPU conversion bit check): decode tokens/s of fp16 / 4-bit packed /
#                 transformers, with and without CUDA graphs, fraction of the bandwidth bound,
#                 a per-kernel profile;
#   gemv-tests    tests/test_gemv_cuda.py: the fused CUDA GEMVs at real layer sizes against a
#                 float64 product, float16 in/out, capture in a CUDA graph;
#   kernel-tests  tests/test_kernels.py: the CUDA kernels bit for bit against the numpy
#                 reference, with larger tensors than the simulator allows (issue 2);
#   kernel-bench  scripts/kernel_bench.py: weights/s of quantize_pack and dequantize for
#                 k = 2..8 on 4096x4096 and 16384x16384, against the CPU kernels (issue 2);
#   convert-bench benchmarks/bench_convert.py on this machine's cores (issue 3): conversion
#                 throughput of 2 and 6 GB synthetic checkpoints against cat, then the 6 GB
#                 one with --device cuda (not in the default steps: name it in KBIT_GPU_STEPS).
# Logs and reports go to $OUT (else $KBIT_GPU_LOG, default /tmp/kbit-gpu-logs).
# Fails loudly (exit 1) when there is no usable GPU.
#
# Python: $PYTHON, else the first of .venv/bin/python, /opt/torch/.venv/bin/python3, python3
# that has numpy and numba. The CUDA target: the numba-cuda package when importable (the
# built-in numba.cuda is deprecated upstream); if it is missing, wheels in .whl/ are
# installed (--no-deps: for machines without network), else pip installs numba-cuda
# (first --no-deps, then with the cuXX extra for the driver's CUDA major version), always
# into a private folder ($KBIT_GPU_SITE, default /tmp/kbit-gpu-site) put on PYTHONPATH,
# never into the environment itself; if all that fails, numba's built-in CUDA target is
# tried. The script prints which one it uses.
#   KBIT_GPU_SIZES       benchmark sizes (default 4096x4096,16384x16384)
#   KBIT_GPU_PYTEST      extra pytest arguments
#   KBIT_GPU_TEST_K      a pytest -k expression for the GEMV and runner tests (e.g. "graph or float16")
#   KBIT_GPU_NO_INSTALL  1: install nothing
#   KBIT_GPU_MODELS      bench_gpu.py models (default 7b8; "small,7b8" adds the SmolLM2 shape and
#                        the GPU-vs-CPU conversion bit check)
#   KBIT_GPU_STEPS       which steps (default: runner-tests gemv-bench bench-gpu gemv-tests kernel-tests kernel-bench)
#   KBIT_GPU_T_TESTS / _T_GBENCH / _T_BENCH / _T_GTESTS / _T_KTESTS / _T_KBENCH / _T_CBENCH   per-step time limits (s)
#   KBIT_GPU_GBENCH_ARGS / KBIT_GPU_BENCH_ARGS   extra arguments of bench_gemv_cuda.py / bench_gpu.py
#                        (e.g. "--bits 4 --sweep-shapes 4096x4096" / "--skip eager,bit planes")
#   KBIT_GPU_CONVERT_SIZES  convert-bench sizes in GB (default 2,6)
#   KBIT_GPU_CONVERT_CUDA   0: convert-bench without its --device cuda run
#   KBIT_GPU_CONVERT_ARGS   extra arguments of the CPU run of bench_convert.py (e.g. "--no-naive --no-cold-run")
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
die() { echo; echo "gpu_check: FAILED: $*" >&2; exit 1; }
say() { echo; echo "== $*"; }
T0=$(date +%s)

say "GPU"
command -v nvidia-smi >/dev/null 2>&1 || die "nvidia-smi not found: this needs a machine with an NVIDIA GPU and driver (on a CPU machine use --device cpu; the CUDA kernels are tested there under Numba's simulator)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || die "nvidia-smi cannot talk to the driver"
nvidia-smi -L | grep -q "GPU" || die "nvidia-smi lists no GPU"
CUDA_MAJOR=$(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9]*\).*/\1/p' | head -1)
echo "driver supports CUDA ${CUDA_MAJOR:-?}"

say "Python"
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for c in .venv/bin/python /opt/torch/.venv/bin/python3 python3; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c "import numpy, numba" >/dev/null 2>&1; then PY=$c; break; fi
  done
fi
[ -n "$PY" ] || die "no Python with numpy and numba found (set PYTHON=/path/to/python)"
"$PY" -c "import sys, numpy, numba; print(sys.executable, sys.version.split()[0], '| numpy', numpy.__version__, '| numba', numba.__version__)"
export PYTHONPATH="$ROOT/formats:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
unset NUMBA_ENABLE_CUDASIM
export KBIT_REAL_GPU=1
export PYTHONUNBUFFERED=1
export NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS=0  # tiny test grids
if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ]; then export CUDA_HOME=/usr/local/cuda; fi

have_numba_cuda() { "$PY" -c "import numba_cuda" >/dev/null 2>&1; }
cuda_works() {
  "$PY" - <<'EOF' >/dev/null 2>&1
import numpy as np
from numba import cuda
from numba.cuda import libdevice
assert cuda.is_available()
@cuda.jit
def k(a, b, out):
    i = cuda.grid(1)
    if i < out.size:
        out[i] = libdevice.fadd_rn(libdevice.fmul_rn(a[i], b[i]), np.float32(1.0))
a = np.arange(64, dtype=np.float32); out = cuda.device_array(64, np.float32)
k[1, 64](cuda.to_device(a), cuda.to_device(a), out)
assert np.array_equal(out.copy_to_host(), a * a + np.float32(1))
EOF
}

say "numba CUDA target"
# Anything installed goes to a private folder (never into the Python environment itself);
# a sitecustomize there processes its .pth files (numba-cuda redirects numba.cuda by one).
SITE=${KBIT_GPU_SITE:-/tmp/kbit-gpu-site}
use_site() {
  mkdir -p "$SITE"
  printf 'import os, site\nsite.addsitedir(os.path.dirname(os.path.abspath(__file__)))\n' > "$SITE/sitecustomize.py"
  case ":$PYTHONPATH:" in *":$SITE:"*) ;; *) export PYTHONPATH="$SITE:$PYTHONPATH";; esac
}
if [ -d "$SITE" ] && ls "$SITE"/numba_cuda* >/dev/null 2>&1; then use_site; fi
if ! have_numba_cuda && [ "${KBIT_GPU_NO_INSTALL:-0}" != "1" ]; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    echo "installing the wheels in .whl/ (--no-deps) into $SITE"
    use_site
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl \
      || echo "installing .whl/*.whl failed"
  else
    echo "numba-cuda is not installed: pip install into $SITE (needs network)"
    use_site
    timeout 180 "$PY" -m pip install -q --no-deps --target "$SITE" numba-cuda \
      || echo "pip install --no-deps numba-cuda failed"
    if ! cuda_works && [ -n "${CUDA_MAJOR:-}" ]; then
      echo "numba-cuda alone does not run: adding its CUDA ${CUDA_MAJOR} dependencies"
      timeout 300 "$PY" -m pip install -q --target "$SITE" --upgrade "numba-cuda[cu${CUDA_MAJOR}]" \
        || echo "pip install numba-cuda[cu${CUDA_MAJOR}] failed"
    fi
  fi
fi
# numba-cuda releases before numpy 2.5 register an overload for np.row_stack, which numpy
# 2.5 removed (an alias of np.vstack): on such a pair the import fails. The shim (a
# sitecustomize in a private folder on PYTHONPATH) restores the alias for this run only.
if "$PY" -c "import numpy, sys; sys.exit(hasattr(numpy, 'row_stack'))" >/dev/null 2>&1; then
  SHIM=${KBIT_GPU_SHIM:-/tmp/kbit-gpu-shim}
  mkdir -p "$SHIM"
  printf 'import numpy\nif not hasattr(numpy, "row_stack"):\n    numpy.row_stack = numpy.vstack\n' > "$SHIM/sitecustomize.py"
  export PYTHONPATH="$SHIM:$PYTHONPATH"
  echo "numpy $("$PY" -c 'import numpy; print(numpy.__version__)') has no row_stack, which this numba-cuda needs: shim in $SHIM"
fi
"$PY" - <<'EOF' || die "numba's CUDA target cannot be imported"
import numba
from numba import cuda
try:
    import numba_cuda
    ver = getattr(numba_cuda, "__version__", "?")
    print(f"numba-cuda {ver} at {numba_cuda.__file__}")
except ImportError:
    print("numba-cuda not installed: numba's built-in (deprecated) CUDA target")
print("numba.cuda implementation:", getattr(cuda, "implementation", "?"), "|", cuda.__file__)
print("cuda.is_available():", cuda.is_available())
if cuda.is_available():
    d = cuda.get_current_device()
    print("device:", d.name, "compute capability", d.compute_capability)
    try:
        print("CUDA runtime:", cuda.runtime.get_version())
    except Exception as e:
        print("CUDA runtime version unknown:", e)
EOF
if ! cuda_works; then
  "$PY" -c "from numba import cuda; cuda.detect()" || true
  die "a trivial Numba CUDA kernel (with libdevice fmul_rn/fadd_rn) does not compile or run on this GPU"
fi
echo "a Numba CUDA kernel with libdevice rounding runs: ok"

LOG=${OUT:-${KBIT_GPU_LOG:-/tmp/kbit-gpu-logs}}
mkdir -p "$LOG"
echo "logs and reports in $LOG"
"$PY" -c "import pytest" >/dev/null 2>&1 || die "pytest is not installed for $PY"
# Each step has its own time limit (the whole script fits in about 8 minutes) and a
# failing step does not stop the next ones; the summary lists them all.
declare -A RC
run_step() {
  local name=$1 secs=$2; shift 2
  say "$name (limit ${secs} s)"
  local t0=$(date +%s)
  timeout "$secs" "$@" 2>&1 | tee "$LOG/$name.log"
  RC[$name]=${PIPESTATUS[0]}
  echo "-- $name: exit ${RC[$name]} in $(( $(date +%s) - t0 )) s"
}
# shellcheck disable=SC2086
STEPS=" ${KBIT_GPU_STEPS:-runner-tests gemv-bench bench-gpu gemv-tests kernel-tests kernel-bench} "
step() {  # step NAME SECONDS command...  (only the steps named in KBIT_GPU_STEPS)
  case $STEPS in *" $1 "*) run_step "$@";; *) echo; echo "== $1: not selected (KBIT_GPU_STEPS)";; esac
}
step gemv-bench "${KBIT_GPU_T_GBENCH:-100}" "$PY" benchmarks/bench_gemv_cuda.py \
  --json "$LOG/bench_gemv_cuda.json" --markdown "$LOG/bench_gemv_cuda.md" ${KBIT_GPU_GBENCH_ARGS:-}
# The runner and the GEMV tests are two steps with their own limits (each test shape compiles
# its kernels: in one step of 110-170 s the runner tests alone used the whole limit).
step runner-tests "${KBIT_GPU_T_TESTS:-200}" "$PY" -m pytest -q -p no:cacheprovider -rs \
  tests/test_runner_gpu.py ${KBIT_GPU_TEST_K:+-k "$KBIT_GPU_TEST_K"} ${KBIT_GPU_PYTEST:-}
step gemv-tests "${KBIT_GPU_T_GTESTS:-150}" "$PY" -m pytest -q -p no:cacheprovider -rs \
  tests/test_gemv_cuda.py ${KBIT_GPU_TEST_K:+-k "$KBIT_GPU_TEST_K"} ${KBIT_GPU_PYTEST:-}
step bench-gpu "${KBIT_GPU_T_BENCH:-200}" "$PY" benchmarks/bench_gpu.py --models "${KBIT_GPU_MODELS:-7b8}" \
  --repeats 3 --markdown "$LOG/bench_gpu.md" --json "$LOG/bench_gpu.json" ${KBIT_GPU_BENCH_ARGS:-}
# shellcheck disable=SC2086
step kernel-tests "${KBIT_GPU_T_KTESTS:-110}" "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_kernels.py ${KBIT_GPU_PYTEST:-}
step kernel-bench "${KBIT_GPU_T_KBENCH:-80}" "$PY" scripts/kernel_bench.py --devices cuda,cpu --bits 2-8 --reps 5 \
  --sizes "${KBIT_GPU_SIZES:-4096x4096,16384x16384}" --cpu-max-weights 2e7
step convert-bench "${KBIT_GPU_T_CBENCH:-150}" bash -c '"$0" benchmarks/bench_convert.py --threads "$(nproc)" \
  --sizes "${KBIT_GPU_CONVERT_SIZES:-2,6}" --repeat 2 --no-general --no-embedded ${KBIT_GPU_CONVERT_ARGS:-} --workdir /tmp/kbit-bench \
  --markdown "$1/bench_convert.md" && { [ "${KBIT_GPU_CONVERT_CUDA:-1}" = 0 ] || "$0" benchmarks/bench_convert.py \
  --threads "$(nproc)" --device cuda --sizes "${KBIT_GPU_CONVERT_SIZES##*,}" --no-general --no-embedded --no-naive \
  --no-library-row --workdir /tmp/kbit-bench --markdown "$1/bench_convert_cuda.md"; }' "$PY" "$LOG"

say "summary ($(( $(date +%s) - T0 )) s)"
FAIL=0
for n in $STEPS; do
  r=${RC[$n]:-?}
  case $r in 0) echo "$n: ok";; 124) echo "$n: TIMED OUT"; FAIL=1;; *) echo "$n: FAILED (exit $r)"; FAIL=1;; esac
done
[ $FAIL -eq 0 ] || die "see above (logs in $LOG)"
echo "gpu_check: OK"
