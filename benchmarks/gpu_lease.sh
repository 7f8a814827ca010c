#!/usr/bin/env bash
# One short lease of a CUDA machine, in one call (the device tool's `run`), each part under its own
# time limit so that one part that hangs or fails leaves the others' results (all under $OUT):
#   1. install the wheels carried in .whl/: ddpmkit's own, built here with
#      `pip wheel --no-deps --no-build-isolation -w .whl .`, and what the machine's image lacks
#      (diffusers, mlxtend, torch-fidelity, ema-pytorch, importlib_metadata, lazy-importer);
#   2. the CUDA tests of tests/test_accel.py with CUDA visible (DDPMKIT_TEST_CUDA=1): graph replay
#      equals eager, the fast path's samples stay close to fp32, the sampling loop never syncs,
#      `ddpmkit run` on the default device → tests-cuda.log;
#   3. `ddpmkit run` with no arguments (the CUDA defaults), timed, then `ddpmkit sample` of it; the
#      run's weights, config, metrics and grid in default.tgz, for scoring on a CPU afterwards (the
#      judges need the MNIST test split, which stays on the CPU machine). Beside it, on the CPU
#      cores, tests/test_accel.py and tests/test_fast_path_matrix.py with CUDA hidden → tests-cpu.log;
#   4. benchmarks/gpu_fast_path.py (sampling, conditional, training rows) → gpu.json; GPU_LEASE_COMPILE=1
#      adds the torch.compile rows (about 2 minutes more).
# Usage (the device tool): bash benchmarks/gpu_lease.sh   with carry [".whl"]; about 5 minutes.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-lease-out}
LIMIT=${GPU_LEASE_LIMIT:-310}  # seconds for the whole script
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
log="$OUT/lease.log"
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*" | tee -a "$log"; }
left() { echo $(( LIMIT - ( $(date +%s) - t0 ) )); }

stamp "install"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  >>"$log" 2>&1 || { stamp "install failed"; exit 1; }
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >>"$log" 2>&1
python3 -c "import torch, diffusers, ddpmkit; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tee -a "$log"

stamp "CUDA tests"
DDPMKIT_TEST_CUDA=1 timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_accel.py -k cuda -rs \
  >"$OUT/tests-cuda.log" 2>&1
grep -E "passed|failed|SKIPPED|FAILED|Error" "$OUT/tests-cuda.log" | tail -12 | tee -a "$log"

stamp "ddpmkit run (no arguments), beside the CPU tests"
(timeout 150 python3 -m pytest -q -p no:cacheprovider -n 6 tests/test_accel.py tests/test_fast_path_matrix.py \
   -p no:logging --tb=short >"$OUT/tests-cpu.log" 2>&1) &
runs=/tmp/runs
mkdir -p $runs
a=$(date +%s)
(cd /tmp && timeout 150 python3 -m ddpmkit run --out $runs/default >$runs/default.log 2>&1)
stamp "ddpmkit run: rc $?, $(( $(date +%s) - a )) s; $(tail -5 $runs/default.log | tr '\n' ' ')"
(cd /tmp && timeout 40 python3 -m ddpmkit sample $runs/default -n 500 --out $runs/default/sample500.png 2>&1 | tail -2) | tee -a "$log"
[ -e $runs/default/model.safetensors ] && tar czf "$OUT/default.tgz" -C $runs default/model.safetensors \
  default/config.json default/metrics.jsonl default/samples.png
wait
grep -E "passed|failed|FAILED|Error" "$OUT/tests-cpu.log" | tail -12 | tee -a "$log"

stamp "benchmarks/gpu_fast_path.py"
compile=--no-compile
[ "${GPU_LEASE_COMPILE:-0}" = 1 ] && compile=
timeout $(( $(left) > 30 ? $(left) : 30 )) python3 benchmarks/gpu_fast_path.py -n 256 --rounds 1 $compile \
  --json "$OUT/gpu.json" 2>&1 | grep -v "Loading pipeline" | tee -a "$log"
ls -la "$OUT" | tee -a "$log"
stamp "done"
