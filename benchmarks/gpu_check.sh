#!/usr/bin/env bash
# The one GPU check of bench_gpu.py, run from the repository root on the lent machine (no internet, no Opacus,
# W&B or Hydra needed): the device, the torch/CUDA versions, then the benchmark, its table in $OUT/gpu.md and
# its whole log in $OUT/log.txt. With the defaults the measurements stop after --budget-seconds (210 s).
set -o pipefail
OUT="${OUT:-/tmp/bench_gpu}"  # the device tool sets OUT
mkdir -p "$OUT"
nvidia-smi
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
PYTHONPATH=. PYTHONUNBUFFERED=1 python3 benchmarks/bench_gpu.py --out "$OUT/gpu.md" "$@" 2>&1 | tee "$OUT/log.txt"
# the calibrated estimate's CUDA paths against the CPU on the default model and data (exact route, data span)
PYTHONPATH=. PYTHONUNBUFFERED=1 timeout 120 python3 benchmarks/gpu_paths.py --probes 32 2>&1 | tee "$OUT/paths.txt"
