#!/usr/bin/env bash
# Puts into ./.whl/extra the wheels scripts/gpu_checks.sh installs on the lent GPU only where the image
# lacks them: pytest (to run the GPU tests at all) and matplotlib (bench.png, the trainer's routing
# heatmaps, the profiler's plots), with what they need, for Python 3.12 on x86-64. Run it from the
# project root on the CPU machine after ../shared/device/fetch-wheels.sh; carry .whl as before.
# (scikit-learn is not among them: the digits ship with moe_engine, and scipy alone would take half
# of the 64 MiB a device call may carry.)
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
exclude="$(git rev-parse --git-path info/exclude)"  # .whl/ stays out of git, as fetch-wheels.sh keeps it
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
# Pinned, so the folder holds one wheel per package (two versions of one would stop the install).
rm -rf .whl/extra
mkdir -p .whl/extra
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
  -d .whl/extra pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pygments==2.21.0 packaging==26.4 \
  matplotlib==3.11.2 contourpy==1.4.0 cycler==0.12.1 fonttools==4.68.0 kiwisolver==1.5.1 pyparsing==3.3.3 \
  pillow==13.0.0 python-dateutil==4.0.0 six==1.17.0
ls -1 .whl/extra
du -sh .whl
