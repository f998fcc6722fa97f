"""Install the wheels of .whl/extra (scripts/fetch_gpu_extras.sh) whose module the GPU image lacks.

    python3 scripts/gpu_install_missing.py .whl/extra /tmp/site

A wheel is installed (pip --target, no index, no dependencies) only where its import fails, so the
image's own pytest or matplotlib, if it has them, are the ones that run. Prints what it installed.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

# Distribution name in a wheel's file name -> the module it provides.
MODULES = {
    "pytest": "pytest", "pluggy": "pluggy", "iniconfig": "iniconfig", "pygments": "pygments", "packaging": "packaging",
    "matplotlib": "matplotlib", "contourpy": "contourpy", "cycler": "cycler", "fonttools": "fontTools",
    "kiwisolver": "kiwisolver", "pyparsing": "pyparsing", "pillow": "PIL", "python_dateutil": "dateutil", "six": "six",
}


def missing_wheels(folder: Path) -> list[Path]:
    wheels = []
    for wheel in sorted(folder.glob("*.whl")):
        dist = wheel.name.split("-")[0].lower()
        module = MODULES.get(dist, dist)
        if importlib.util.find_spec(module) is None:
            wheels.append(wheel)
    return wheels


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    folder, target = Path(argv[0]), argv[1]
    if not folder.is_dir():
        print(f"no {folder}: nothing to install (scripts/fetch_gpu_extras.sh fills it)")
        return 0
    wheels = missing_wheels(folder)
    if not wheels:
        print("the image has every extra module")
        return 0
    print("installing what the image lacks:", " ".join(w.name for w in wheels), flush=True)
    return subprocess.call([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                            "--no-cache-dir", "--upgrade", "--target", target, *map(str, wheels)])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
