"""scripts/setup.sh refuses bad install settings before it creates or installs anything."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    # A copy of the script in an empty tree: nothing it could install exists there, and no .venv is touched.
    (tmp_path / "scripts").mkdir(exist_ok=True)
    shutil.copy(ROOT / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    return subprocess.run(
        ["bash", str(tmp_path / "scripts" / "setup.sh")], env={**os.environ, **env}, capture_output=True, text=True, timeout=60,
    )


@pytest.mark.parametrize(
    "env, message",
    [
        ({"MOE_ENGINE_SYSTEM_SITE_PACKAGES": "yes"}, "MOE_ENGINE_SYSTEM_SITE_PACKAGES='yes': allowed: 0 or 1"),
        ({"MOE_ENGINE_SYSTEM_SITE_PACKAGES": "1", "MOE_ENGINE_PYTHON": "/usr/bin/python3"}, "set one"),
    ],
    ids=["bad-value", "both-set"],
)
def test_bad_settings_exit_2_before_any_work(tmp_path: Path, env: dict[str, str], message: str) -> None:
    result = _run(tmp_path, **env)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert not (tmp_path / ".venv").exists()


def test_system_site_packages_refuses_an_isolated_venv(tmp_path: Path) -> None:
    venv = tmp_path / ".venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(shutil.which("python3"))
    (venv / "pyvenv.cfg").write_text("include-system-site-packages = false\n")
    result = _run(tmp_path, MOE_ENGINE_SYSTEM_SITE_PACKAGES="1")
    assert result.returncode == 2 and "exists without system site packages" in result.stderr
