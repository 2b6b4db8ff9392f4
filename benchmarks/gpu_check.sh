#!/usr/bin/env bash
# The GPU check: run it on a machine with a CUDA build of torch and Triton (a bare GPU image will do: it needs torch,
# triton, numpy, scipy, pytest and hypothesis, none of the store's dependencies). Under 5 minutes on one H100/H200:
#   1. tests/test_kernels.py on CUDA: the fused Triton ops against the float64 reference (odd sizes, masks, extreme
#      values, CSR counts, gradcheck), with TRITON_INTERPRET unset so the kernels are compiled for the GPU
#   2. benchmarks/kernels.py: Triton against the PyTorch path and the unfused forms, time and memory, beside the
#      device's copy-bandwidth and matmul floors, at 1024 cells x 2,000 genes and at a training minibatch (128)
#   3. with PEER_PYTHON set (a python with scvi-tools, CUDA torch and this package's dependencies): training
#      throughput against scvi-tools on the same GPU, benchmarks/train.py at 200k cells
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]          # logs and tables into OUT_DIR (default gpu_check/)
#
# Copy the tables into benchmarks/RESULTS.md with the date and the device (nvidia-smi's name, driver, torch).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${1:-gpu_check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

"$PY" - <<'EOF' | tee "$OUT/device.txt"
import torch, triton
assert torch.cuda.is_available(), "no CUDA device: this check is for a GPU machine"
print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"triton {triton.__version__}")
EOF

# The package alone (kernels/ installs as scvi_scale.kernels), without its dependencies, in a folder of its own;
# pytest then runs from outside the checkout, so `scvi_scale` is the installed one.
SITE=$(mktemp -d)
"$PY" -m pip install -q --no-deps --no-build-isolation --no-index --target "$SITE" "$REPO"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"

cd "$SITE"
set -o pipefail
"$PY" -m pytest -q -p no:cacheprovider --rootdir "$REPO" "$REPO/tests/test_kernels.py" 2>&1 | tee "$OUT/kernel_tests.txt"
for cells in 1024 128; do
    "$PY" "$REPO/benchmarks/kernels.py" --cells "$cells" 2>&1 | tee "$OUT/kernels_$cells.txt"
done
if [ -n "${PEER_PYTHON:-}" ]; then
    "$PY" "$REPO/benchmarks/train.py" --peer-python "$PEER_PYTHON" --sizes 200000 --batch-sizes 128 1024 \
        --elbo-cells 5000 --elbo-epochs 2 2>&1 | tee "$OUT/train.txt"
fi
echo "gpu check done: $OUT"
