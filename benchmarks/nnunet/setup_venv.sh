#!/usr/bin/env bash
# Create (or check) the virtual environment nnU-Net v2 runs in for `benchmarks/experts.py --with-nnunet`.
#
#   bash benchmarks/nnunet/setup_venv.sh [VENV]
#
# VENV defaults to $MEDALLOY_NNUNET_VENV, else runs/nnunet-venv in the repository. nnU-Net gets its own
# environment, never medalloy's: `pip install nnunetv2` pulls its own torch (2.14.x, a CUDA build of
# several GB that also runs on CPU) and needs timm, which medalloy's environment has not.
# Idempotent: an existing environment is only topped up (pip skips what is installed) and checked.
# The trainer subclass (nnUNetTrainerBudget.py, next to this script) is not copied anywhere: nnU-Net
# finds it through its `nnUNet_extTrainer` environment variable, which benchmarks/nnunet_peer.py sets.
# Override the package spec with NNUNET_SPEC (default: the version the benchmark was written against).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
VENV="${1:-${MEDALLOY_NNUNET_VENV:-$REPO/runs/nnunet-venv}}"
SPEC="${NNUNET_SPEC:-nnunetv2==2.8.1}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "creating $VENV"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --upgrade pip
fi

if "$VENV/bin/python" -c "import nnunetv2, timm" 2>/dev/null && [ -x "$VENV/bin/nnUNetv2_train" ]; then
    echo "nnunetv2 already installed in $VENV"
else
    # timm: some nnunetv2 releases import it from their train and predict commands without declaring it.
    "$VENV/bin/python" -m pip install "$SPEC" timm
fi

# The check nnU-Net itself makes before training or predicting: can it find the trainer class?
nnUNet_extTrainer="$HERE" "$VENV/bin/python" - <<'PY'
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
import nnunetv2, torch
from importlib.metadata import version
cls = recursive_find_trainer_class_by_name("nnUNetTrainerBudget")
print(f"ok: nnunetv2 {version('nnunetv2')}, torch {torch.__version__}, trainer {cls.__name__} found")
PY
echo "use it with: python -m benchmarks.experts --with-nnunet --nnunet-venv $VENV"
