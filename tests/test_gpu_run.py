"""The one prepared GPU call (scripts/gpu_checks.sh) must keep working on an image that lacks packages.

A lent GPU is rare and short, so what can be checked here is: the GPU tests are collected without the
packages the image may lack (scikit-learn, matplotlib, TensorBoard, SciPy), the extras installer picks
only what is missing, and scripts/gpu_figures.py writes its three JSON files, cheapest first.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from gpu_install_missing import missing_wheels  # noqa: E402

# Modules the GPU image may lack: importing one of them while collecting would stop every GPU test.
ABSENT = ("sklearn", "matplotlib", "tensorboard", "scipy")


def test_gpu_tests_are_collected_without_optional_packages(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    # None in sys.modules makes an import fail as if the package were not installed.
    (site / "sitecustomize.py").write_text(f"import sys\nfor name in {ABSENT!r}:\n    sys.modules[name] = None\n")
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "gpu", "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    collected = [line for line in done.stdout.splitlines() if "::" in line]
    assert len(collected) >= 25 and any("test_every_tma_candidate_on_cuda_bf16" in c for c in collected)
    assert "error" not in done.stdout.lower().split("collected")[-1]


def test_extras_are_installed_only_where_the_import_fails(tmp_path: Path) -> None:
    for name in ("pytest-9.2.0-py3-none-any.whl", "pillow-13.0.0-cp312-cp312-manylinux_2_28_x86_64.whl",
                 "pygments-2.21.0-py3-none-any.whl", "moe_engine_absent_pkg-1.0-py3-none-any.whl"):
        (tmp_path / name).write_bytes(b"")
    # pytest (and pygments, which it imports) run this test; pillow is there for matplotlib (module PIL).
    assert [w.name for w in missing_wheels(tmp_path)] == ["moe_engine_absent_pkg-1.0-py3-none-any.whl"]


def test_gpu_figures_writes_micro_dispatch_then_layer(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_figures.py"), str(tmp_path), "--dispatch-shapes", "tiny",
         "--quick", "--shapes", "quick_e8", "--peers", "ours,torch_loop", "--no-plot", "--reps", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    micro = json.loads((tmp_path / "micro.json").read_text())
    dispatch = json.loads((tmp_path / "dispatch.json").read_text())
    layer = json.loads((tmp_path / "bench.json").read_text())
    assert micro["complete"] and set(micro["settings"]["benchmarks"]) == {"router", "permute"} and micro["router"]
    assert dispatch["complete"] and dispatch["results"]
    assert layer["complete"] and layer["settings"]["benchmarks"] == ["layer"]
    assert set(layer["layer"][0]["paths"]) == {"ours", "torch_loop"}
    order = [done.stdout.index(f"{what} exit status 0") for what in ("micro-benchmarks", "dispatch overhead", "layer benchmark")]
    assert order == sorted(order)
    refused = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_figures.py"), str(tmp_path), "--only", "layer"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--only" in refused.stderr


@pytest.mark.parametrize("script", ["gpu_checks.sh", "fetch_gpu_extras.sh"])
def test_gpu_scripts_parse(script: str) -> None:
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / script)], capture_output=True).returncode == 0


def test_a_failing_stage_costs_the_others_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    # The dispatch overhead running out of memory (say) must not cost the layer benchmark its figures.
    import gpu_figures

    ran = []

    def fake_bench(argv):
        ran.append(argv[argv.index("--only") + 1])
        return 0

    def broken_dispatch(argv):
        raise SystemExit(2)

    import moe_engine.bench.suite as suite

    monkeypatch.setattr(suite, "main", fake_bench)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import dispatch_overhead

    monkeypatch.setattr(dispatch_overhead, "main", broken_dispatch)
    assert gpu_figures.main([str(tmp_path), "--quick"]) == 2
    assert ran == ["router,permute", "layer"]
    out = capsys.readouterr().out
    assert "dispatch overhead exit status 2" in out and "layer benchmark exit status 0" in out
