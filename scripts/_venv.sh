# Sourced by scripts/*.sh and the Dockerfile: make (or reuse) a virtual environment with the package
# in it, torch pinned to a build from PyTorch's own wheel index.
#
# Why the pin: PyPI's `torch==2.13.0` is the CUDA build (several GB with about 20 nvidia-* and triton
# packages). `torch==2.13.0+cpu` names the CPU build by its local version, which only PyTorch's CPU
# index carries, so no pip configuration (another index, a mirror, a cache) can swap in a CUDA build.
# Two pip calls: torch (and its few dependencies) is the only thing looked up on PyTorch's index;
# the package comes from pip's usual index with the same pin, which the installed torch satisfies.
# tests/test_install.py dry-runs these commands with pip's configuration ignored.
#
#   TORCH_VARIANT  cpu (default), or a CUDA build of 2.13.0 listed at https://download.pytorch.org/whl/
#                  (e.g. cu128) for training on a GPU machine
#   TORCH_INDEX    the wheel index holding that build (default: PyTorch's index for TORCH_VARIANT)
#   VENV           where the environment goes (default .venv)
#   PACKAGE        what to install with torch (default: this checkout, editable, with EXTRAS)
VENV=${VENV:-.venv}
TORCH_VERSION=2.13.0
TORCH_VARIANT=${TORCH_VARIANT:-cpu}
TORCH_INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl/$TORCH_VARIANT}
TORCH_REQUIREMENT="torch==$TORCH_VERSION+$TORCH_VARIANT"
PACKAGE=${PACKAGE:--e .[$EXTRAS]}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "$TORCH_REQUIREMENT" --extra-index-url "$TORCH_INDEX"
# shellcheck disable=SC2086  # PACKAGE may be "-e .[extras]": two words on purpose
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "$TORCH_REQUIREMENT" $PACKAGE
