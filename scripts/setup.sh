#!/usr/bin/env bash
# Installs moe_engine and its whole stack into ./.venv (or into $MOE_ENGINE_PYTHON's environment).
# The README, .ci/run and the Dockerfile all call this one script, so CI exercises the user's path.
#
# torch: a torch already importable by the target Python is kept as it is (a CUDA build stays).
# Otherwise torch==2.13.0 is installed first: an unpinned resolve would pull a multi-GB CUDA build.
# deepspeed ships as a source distribution whose setup.py imports torch, so it is built without
# build isolation against the torch installed here (DS_BUILD_OPS=0: its ops JIT-compile on use).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

if [[ -n "${MOE_ENGINE_PYTHON:-}" ]]; then
    py="$MOE_ENGINE_PYTHON"
else
    if [[ ! -x .venv/bin/python ]]; then
        echo "[setup] creating .venv"
        python3 -m venv .venv
    fi
    py="$root/.venv/bin/python"
fi
pip=("$py" -m pip install --disable-pip-version-check --progress-bar off -q)
# This machine's pip.conf may name local index folders that do not exist; pip warns about each.
quiet_pip() { "${pip[@]}" "$@" 2> >(grep -v "is ignored: it is neither" >&2); }

if "$py" -c "import torch" 2>/dev/null; then
    echo "[setup] keeping torch $("$py" -c 'import torch; print(torch.__version__)')"
else
    echo "[setup] installing torch==2.13.0"
    quiet_pip "torch==2.13.0"
fi
torch_pin="torch==$("$py" -c 'import torch; print(torch.__version__.split("+")[0])')"
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "$torch_pin" > "$constraints"

if ! "$py" -c "import deepspeed" 2>/dev/null; then
    echo "[setup] installing deepspeed (pure-Python build against the installed torch)"
    quiet_pip setuptools wheel
    DS_BUILD_OPS=0 quiet_pip --no-build-isolation -c "$constraints" "deepspeed>=0.16"
fi
echo "[setup] installing moe-engine and its dependencies"
quiet_pip -c "$constraints" -e ".[dev]"
"$py" -c "import moe_engine, torch, triton, deepspeed, megatron.core, transformers, datasets" 2>/dev/null \
    || { echo "[setup] import check failed" >&2; "$py" -c "import moe_engine, torch, triton, deepspeed, megatron.core, transformers, datasets"; exit 1; }
echo "[setup] done: $("$py" -c 'import torch, triton, deepspeed, transformers, datasets; print(f"torch {torch.__version__}, triton {triton.__version__}, deepspeed {deepspeed.__version__}, transformers {transformers.__version__}, datasets {datasets.__version__}")')"
