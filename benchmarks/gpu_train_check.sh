#!/usr/bin/env bash
# The monitor in whole `python train.py` runs on a lent GPU (accelerator auto → cuda): the default digits run,
# the same under defense=gaussian and defense=anisotropic, and ResNet-18 on CIFAR-size fake data for 2 epochs.
# Where the machine has no Hydra, put its wheels (hydra-core, omegaconf, antlr4-python3-runtime) in .whl/: they are
# installed to /tmp/site first. Prints each run's I2FMonitor line and leakage summary; measures, asserts nothing.
set -u
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
fi
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 WANDB_MODE=disabled
OUT="${OUT:-/tmp/gpu_train}"
mkdir -p "$OUT"
run() {
  local name=$1; shift
  local start=$SECONDS
  timeout 240 python3 train.py logger=none trainer.enable_progress_bar=false "paths.log_dir=/tmp/gpu_train_logs/$name" "$@" \
    > "$OUT/$name.txt" 2>&1
  echo "== $name (rc $?, $((SECONDS - start)) s wall): $*"
  grep -E "I2FMonitor: [0-9]+ evaluations|leakage/(expected_attack_psnr|probes|measured_at_step|sigma_for_target)|val/acc " \
    "$OUT/$name.txt" | head -8
}
run default
run gaussian defense=gaussian
run anisotropic defense=anisotropic defense.sigma=0.01
run resnet18 data=fake "data.input_shape=[3,32,32]" model=resnet18 optim=sgd trainer.max_epochs=2
