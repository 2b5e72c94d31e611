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
# Why the probe: pip retries an index it cannot reach (5 times per page, with back-off), which took
# about a minute of "Retrying" warnings before a wheel on local disk was used. So an http(s) index is
# asked once, with a short timeout; when it does not answer, one line says so and pip is not told about
# it: the pinned build then comes from what pip finds without it (its configured index and find-links).
# When nothing serves the pinned build, the install stops with the one command that fixes it.
#
#   TORCH_VARIANT  cpu (default), or a CUDA build of 2.13.0 listed at https://download.pytorch.org/whl/
#                  (e.g. cu128) for training on a GPU machine
#   TORCH_INDEX    the wheel index holding that build (default: PyTorch's index for TORCH_VARIANT), or a
#                  folder (or one .whl file) holding the wheel
#   TORCH_PROBE_SECONDS  how long the index may take to answer the probe (default 3)
#   TORCH_FIX      the command a failed install names (default: this script again with TORCH_INDEX set)
#   VENV           where the environment goes (default .venv)
#   PACKAGE        what to install with torch (default: this checkout, editable, with EXTRAS)
VENV=${VENV:-.venv}
TORCH_VERSION=2.13.0
TORCH_VARIANT=${TORCH_VARIANT:-cpu}
TORCH_INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl/$TORCH_VARIANT}
TORCH_PROBE_SECONDS=${TORCH_PROBE_SECONDS:-3}
TORCH_REQUIREMENT="torch==$TORCH_VERSION+$TORCH_VARIANT"
TORCH_FIX=${TORCH_FIX:-"TORCH_INDEX=<a wheel index URL, or a folder holding torch-$TORCH_VERSION+$TORCH_VARIANT-*.whl> bash $0"}
PACKAGE=${PACKAGE:--e .[$EXTRAS]}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi

# The probe: exit 0 when the index answers (an HTTP error below 500 is an answer: pip gets it at once,
# without retries), else print the reason and exit 1.
TORCH_PROBE_PY='
import sys, threading, urllib.error, urllib.request

url, seconds = sys.argv[1], float(sys.argv[2])
answer = []


def probe():
    try:
        urllib.request.urlopen(url, timeout=seconds).close()
        answer.append("")
    except urllib.error.HTTPError as exc:
        answer.append("" if exc.code < 500 else f"HTTP {exc.code}")
    except Exception as exc:
        answer.append(str(getattr(exc, "reason", exc)))


worker = threading.Thread(target=probe, daemon=True)
worker.start()
worker.join(seconds)
reason = answer[0] if answer else f"no answer within {seconds:g} s"
print(reason)
sys.exit(1 if reason else 0)
'

# Where pip looks for torch: the index (--extra-index-url), a local folder (--find-links), or only
# pip's own sources (no flag) when the index does not answer or this build is installed already.
torch_flag=--extra-index-url
torch_source=$TORCH_INDEX
if ls -d "$VENV"/lib/python*/site-packages/torch-"$TORCH_VERSION+$TORCH_VARIANT".dist-info >/dev/null 2>&1; then
    torch_flag=  # installed: pip finds it satisfied without asking any index
elif [ -d "$TORCH_INDEX" ]; then
    torch_flag=--find-links
elif [ -f "$TORCH_INDEX" ]; then
    torch_flag=--find-links
    torch_source=$(dirname "$TORCH_INDEX")
else
    case $TORCH_INDEX in
    http://* | https://*)
        # One request, bounded as a whole (name lookup included): a thread the probe stops waiting for.
        if ! torch_probe=$(python3 -c "$TORCH_PROBE_PY" "${TORCH_INDEX%/}/torch/" "$TORCH_PROBE_SECONDS" 2>&1); then
            echo "_venv.sh: $TORCH_INDEX did not answer ($torch_probe); looking for $TORCH_REQUIREMENT only where pip finds packages without it" >&2
            torch_flag=
        fi
        ;;
    esac
fi
torch_log=$(mktemp)
if ! "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$TORCH_REQUIREMENT" \
    ${torch_flag:+"$torch_flag"} ${torch_flag:+"$torch_source"} 2>"$torch_log"; then
    cat "$torch_log" >&2
    if grep -q "No matching distribution found for torch" "$torch_log"; then
        echo "_venv.sh: nothing pip can reach serves $TORCH_REQUIREMENT; fix: $TORCH_FIX" >&2
    fi
    rm -f "$torch_log"
    exit 1
fi
cat "$torch_log" >&2
rm -f "$torch_log"
# shellcheck disable=SC2086  # PACKAGE may be "-e .[extras]": two words on purpose
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "$TORCH_REQUIREMENT" $PACKAGE
