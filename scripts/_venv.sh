# Sourced by scripts/*.sh: make (or reuse) the project's virtual environment with the package in it.
# torch is installed first and pinned: a bare `torch` requirement on a machine without torch pulls
# a multi-GB CUDA build. Override with TORCH_SPEC (e.g. "torch==2.13.0 --index-url <cpu index>").
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check $TORCH_SPEC
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[$EXTRAS]"
