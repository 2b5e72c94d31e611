# Sourced by scripts/*.sh: make (or reuse) the project's virtual environment with the package in it.
# torch is installed first, as the CPU build from PyTorch's CPU wheel index: a bare `torch==2.13.0`
# on a normal machine pulls the multi-GB CUDA build and about 20 nvidia-* packages. Override with
# TORCH_SPEC (e.g. TORCH_SPEC="torch==2.13.0" for CUDA).
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0+cpu --extra-index-url https://download.pytorch.org/whl/cpu}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
# shellcheck disable=SC2086  # TORCH_SPEC is a requirement plus pip options, split on purpose
"$VENV/bin/python" -m pip install -q --disable-pip-version-check $TORCH_SPEC
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[$EXTRAS]"
