#!/usr/bin/env bash
# The prepared GPU check (about 6 minutes on an H100/H200), run once when a GPU machine is lent:
#   1. the CUDA tests (sync-free losses, Triton kernel against the torch path),
#   2. bench/loss_speed.py on CUDA (incl. 8192 x 128000 bf16, the kernel's target shape),
#   3. bench/train_speed.py on CUDA with bf16 AMP and torch.compile.
# On a machine without CUDA it says what it skips and runs the CPU-only parts that are quick.
# Output: the tables on stdout, and copies under $OUT (or ./gpu-results) for the README.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
[[ -x .venv/bin/python ]] && PY=.venv/bin/python
OUT_DIR=${OUT:-gpu-results}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "gpu.sh: no torch for $PY; install the project first (pip install -e '.[test]')"; exit 2
fi
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  "$PY" -c "import torch; print('device:', torch.cuda.get_device_name(0), 'torch', torch.__version__)" | tee "$OUT_DIR/device.txt"
  echo "== 1/3 CUDA tests"
  timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_compile.py -k cuda tests/test_pcd_triton.py 2>&1 \
    | tail -20 | tee "$OUT_DIR/tests.txt"
  echo "== 2/3 loss_speed on CUDA"
  timeout 180 "$PY" bench/loss_speed.py --device cuda --quick --methods "textbook KD" KD DKD "PCD K=3" \
    "PCD K=3 (Triton)" "PCD K=7" "PCD released" \
    --shapes 256x1000:fp32 1024x1000:fp32 128x32000:fp32 4096x32000:bf16 512x128000:fp32 512x128000:bf16 \
    8192x128000:bf16 2>&1 | grep -v "USDT\|^ERROR:" | tee "$OUT_DIR/loss_speed_cuda.md"
  echo "== 3/3 train_speed on CUDA, bf16 AMP + torch.compile"
  timeout 120 "$PY" bench/train_speed.py --device cuda --amp --compile --quick --no-pipeline 2>&1 \
    | tee "$OUT_DIR/train_speed_cuda.md"
else
  echo "gpu.sh: CUDA is not available: skipping the CUDA tests, loss_speed on CUDA and train_speed on CUDA."
  echo "gpu.sh: running what a CPU can in a minute: the Triton kernel under the interpreter and one loss_speed row."
  TRITON_INTERPRET=1 timeout 300 "$PY" -m pytest -q -p no:cacheprovider tests/test_pcd_triton.py 2>&1 | tail -5
  timeout 300 "$PY" bench/loss_speed.py --device cpu --quick --shapes 256x1000:fp32 --methods KD "PCD K=3" \
    2>&1 | grep -v "USDT\|^ERROR:"
fi
