#!/usr/bin/env bash
# One short lease of a CUDA machine, in one call (the device tool's `run`), each part under its own
# time limit so that one part that hangs or fails leaves the others' results:
#   1. install: the wheels carried in .whl/ (ddpmkit's own, built here with
#      `pip wheel --no-deps --no-build-isolation -w .whl .`, and what the machine's image lacks:
#      diffusers, mlxtend, torch-fidelity, ema-pytorch, importlib_metadata, lazy-importer);
#   2. benchmarks/gpu_fast_path.py (sampling, conditional, training rows) with --json, alone on
#      the GPU so that its timings are clean;
#   3. then side by side on the GPU: the CUDA tests (tests/test_accel.py: graph replay equals
#      eager, the fast path's samples stay close to fp32, the sampling loop never syncs; and the
#      fast-path matrix), `ddpmkit run` with no arguments (the CUDA defaults), timed, and the
#      unconditional run at 1x and 4x the default's 18 epochs (how far more training takes the
#      unconditional model, issue 30); each run's weights, config, metrics and grid packed into
#      $OUT for scoring on a CPU afterwards (the judges need the MNIST test split, which stays here).
# Usage (the device tool): bash benchmarks/gpu_lease.sh   with carry [".whl"]; writes under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-lease-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
log="$OUT/lease.log"
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*" | tee -a "$log"; }

stamp "install"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  >>"$log" 2>&1 || { stamp "install failed"; exit 1; }
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >>"$log" 2>&1
python3 -c "import torch, diffusers, ddpmkit; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tee -a "$log"

stamp "benchmarks/gpu_fast_path.py"
timeout 300 python3 benchmarks/gpu_fast_path.py -n 256 --rounds 2 --json "$OUT/gpu.json" 2>&1 | tee -a "$log"

# Then, side by side on the same GPU: the unconditional run at 1x and 4x the default's 18 epochs,
# the tests and the default run.
runs=/tmp/runs
mkdir -p $runs
left=$(( 570 - ( $(date +%s) - t0 ) ))
for e in 18 72; do
  (cd /tmp && timeout $left python3 -m ddpmkit run --unconditional --epochs $e --out $runs/uncond-$e \
     >$runs/uncond-$e.log 2>&1; echo "rc=$?" >>$runs/uncond-$e.log) &
done

stamp "tests"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_accel.py tests/test_fast_path_matrix.py -rs 2>&1 | tail -25 | tee -a "$log"

stamp "ddpmkit run (no arguments)"
a=$(date +%s)
(cd /tmp && timeout 200 python3 -m ddpmkit run --out $runs/default 2>&1 | tail -6) | tee -a "$log"
stamp "ddpmkit run took $(( $(date +%s) - a )) s (beside the unconditional runs)"
for r in default; do
  [ -e $runs/$r/model.safetensors ] && tar czf "$OUT/$r.tgz" -C $runs $r/model.safetensors $r/config.json $r/metrics.jsonl $r/samples.png
done

stamp "waiting for the unconditional runs"
wait
for e in 18 72; do
  echo "uncond-$e: $(tail -4 $runs/uncond-$e.log | tr '\n' ' ')" | tee -a "$log"
  r=uncond-$e
  [ -e $runs/$r/model.safetensors ] && tar czf "$OUT/$r.tgz" -C $runs $r/model.safetensors $r/config.json $r/metrics.jsonl $r/samples.png
done
ls -la "$OUT" | tee -a "$log"
stamp "done"
