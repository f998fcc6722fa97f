#!/usr/bin/env bash
# Installs moe_engine and its whole stack into ./.venv (or into $MOE_ENGINE_PYTHON's environment).
# The README, .ci/run and the Dockerfile all call this one script, so CI exercises the user's path.
#
# Where it installs:
#   (default)                          ./.venv, a plain venv made by `python3 -m venv`: it sees none
#                                      of the system's packages, so it gets torch==2.13.0 (CPU).
#   MOE_ENGINE_SYSTEM_SITE_PACKAGES=1  ./.venv made with --system-site-packages: the packages of the
#                                      python3 that creates it stay importable, so a CUDA torch that
#                                      python3 already has (a PyTorch container, a cluster module) is
#                                      used as it is. The Dockerfile installs this way.
#   MOE_ENGINE_PYTHON=/path/to/python  no .venv: straight into that Python's own environment.
#
# torch: a torch already importable by the target Python is kept as it is (a CUDA build stays), and
# the install fails if anything replaced it. Otherwise torch==2.13.0 is installed first: an unpinned
# resolve would pull a multi-GB CUDA build.
# deepspeed ships as a source distribution whose setup.py imports torch, so it is built without
# build isolation against the torch installed here (DS_BUILD_OPS=0: its ops JIT-compile on use).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

system_site="${MOE_ENGINE_SYSTEM_SITE_PACKAGES:-0}"
if [[ "$system_site" != 0 && "$system_site" != 1 ]]; then
    echo "[setup] MOE_ENGINE_SYSTEM_SITE_PACKAGES='$system_site': allowed: 0 or 1" >&2
    exit 2
fi
if [[ -n "${MOE_ENGINE_PYTHON:-}" ]]; then
    if [[ "$system_site" == 1 ]]; then
        echo "[setup] MOE_ENGINE_PYTHON and MOE_ENGINE_SYSTEM_SITE_PACKAGES=1 both set: the first installs into" \
             "that Python, the second into ./.venv; set one" >&2
        exit 2
    fi
    py="$MOE_ENGINE_PYTHON"
else
    if [[ ! -x .venv/bin/python ]]; then
        if [[ "$system_site" == 1 ]]; then
            echo "[setup] creating .venv over $(command -v python3)'s packages (--system-site-packages)"
            python3 -m venv --system-site-packages .venv
        else
            echo "[setup] creating .venv"
            python3 -m venv .venv
        fi
    elif [[ "$system_site" == 1 ]] && ! grep -qE '^include-system-site-packages *= *true' .venv/pyvenv.cfg; then
        # Installing into it would pull the CPU torch beside the system's CUDA one.
        echo "[setup] MOE_ENGINE_SYSTEM_SITE_PACKAGES=1, but $root/.venv exists without system site packages:" \
             "remove it (rm -r .venv) and run this again" >&2
        exit 2
    fi
    py="$root/.venv/bin/python"
fi
pip=("$py" -m pip install --disable-pip-version-check --progress-bar off -q)
# This machine's pip.conf may name local index folders that do not exist; pip warns about each.
quiet_pip() { "${pip[@]}" "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
# Version, CUDA version and location: what must not change once torch is there.
torch_identity() { "$py" -c 'import torch; print(torch.__version__, torch.version.cuda, torch.__file__)'; }

if "$py" -c "import torch" 2>/dev/null; then
    echo "[setup] keeping torch $("$py" -c 'import torch; print(torch.__version__)')"
else
    echo "[setup] installing torch==2.13.0"
    quiet_pip "torch==2.13.0"
fi
torch_before="$(torch_identity)"
torch_pin="torch==$("$py" -c 'import torch; print(torch.__version__.split("+")[0])')"
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "$torch_pin" > "$constraints"

if ! "$py" -c "import deepspeed" >/dev/null 2>&1; then
    echo "[setup] installing deepspeed (pure-Python build against the installed torch)"
    quiet_pip setuptools wheel
    DS_BUILD_OPS=0 quiet_pip --no-build-isolation -c "$constraints" "deepspeed>=0.16"
fi
echo "[setup] installing moe-engine and its dependencies"
quiet_pip -c "$constraints" -e ".[dev]"
torch_after="$(torch_identity)"
if [[ "$torch_after" != "$torch_before" ]]; then
    echo "[setup] the install replaced torch ($torch_before -> $torch_after); a dependency asked for another" \
         "torch: look for it in the pip output above" >&2
    exit 1
fi
"$py" -c "import moe_engine, torch, triton, deepspeed, megatron.core, transformers, datasets" >/dev/null 2>&1 \
    || { echo "[setup] import check failed" >&2; "$py" -c "import moe_engine, torch, triton, deepspeed, megatron.core, transformers, datasets"; exit 1; }
echo "[setup] done: $("$py" -c 'import torch, triton, deepspeed, transformers, datasets; print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, deepspeed {deepspeed.__version__}, transformers {transformers.__version__}, datasets {datasets.__version__}")' 2>/dev/null | tail -n 1)"
