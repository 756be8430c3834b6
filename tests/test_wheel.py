"""A pip-installed user: the built wheel holds the configs, and from an empty folder `esm-gearnet configs` lists
them, `-c EC/esm_gearnet.yaml` (or `config/EC/...`, as the original's command lines) finds them, and `esm-gearnet
demo` runs the offline demo."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_wheel_runs_from_an_empty_folder(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", str(ROOT), "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("esm_gearnet-*.whl")
    site = tmp_path / "site"  # the wheel alone; its dependencies (torch, ...) are those of this environment
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site))

    def run(*args, timeout=120):
        return subprocess.run([sys.executable, "-m", "esm_gearnet", *args], cwd=empty, env=env, capture_output=True,
                              text=True, timeout=timeout)

    where = subprocess.run([sys.executable, "-c", "import esm_gearnet; print(esm_gearnet.__file__)"], cwd=empty,
                           env=env, capture_output=True, text=True).stdout
    assert where.startswith(str(site)), where  # the installed wheel, not this checkout
    listed = run("configs").stdout.splitlines()
    assert "EC/esm_gearnet.yaml" in listed and "demo/esm_gearnet.yaml" in listed and len(listed) > 50
    for name in ("EC/esm_gearnet.yaml", "config/GO/esm_gearnet.yaml"):
        help_ = run("downstream", "-c", name, "--help")
        assert help_.returncode == 0 and help_.stdout.startswith("usage: esm-gearnet downstream"), help_.stderr
    missing = run("downstream", "-c", "EC/nope.yaml")
    assert missing.returncode == 2 and "esm-gearnet configs" in missing.stderr
    demo = run("demo", timeout=600)
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "EC graph:" in demo.stdout and "best validation epoch" in demo.stderr + demo.stdout
    assert list((empty / "output" / "demo").rglob("best.pth"))
