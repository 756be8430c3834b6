"""The benchmark figures: recorded by benchmarks/record.py, rendered by benchmarks/figures.py, never by hand."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import figures  # noqa: E402


def test_every_table_is_what_its_results_render():
    """README.md, benchmarks/README.md and docs/ hold exactly the tables their results files render."""
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "figures.py"), "--check"], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    blocks = [name for page in figures.PAGES for name in figures.BLOCK.findall(page.read_text())]
    assert len(blocks) >= len(figures.RENDER), "every renderer is used by a page"


def test_a_table_edited_by_hand_is_found(tmp_path):
    page = ROOT / "benchmarks" / "README.md"
    text = page.read_text()
    edited = text.replace("structures/s |", "9999 structures/s |", 1)
    assert edited != text
    assert figures.render_page(edited, page) == text  # the block comes back from the results file
    assert figures.render_page(text, page) == text


def test_record_writes_the_results_and_the_command(tmp_path):
    env = {"ESM_GEARNET_BENCH_RESULTS": str(tmp_path), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "record.py"), "--as", "tiny", "peak",
                           "--device", "cpu", "--size", "64", "--repeats", "2"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    record = json.loads((tmp_path / "tiny.json").read_text())
    assert record["command"] == "python benchmarks/peak.py --device cpu --size 64 --repeats 2"
    assert record["results"][0]["benchmark"] == "peak" and record["results"][0]["tflops"] > 0
    assert set(record["machine"]) >= {"cpu", "cores", "python", "torch", "load_average"}


@pytest.mark.parametrize("args, says", [(["nothing_here"], "does not exist"),
                                        (["peak", "--size", "-5"], "nothing recorded")])
def test_record_keeps_nothing_from_a_failed_run(tmp_path, args, says):
    env = {"ESM_GEARNET_BENCH_RESULTS": str(tmp_path), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "record.py"), *args], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode != 0 and says in done.stderr
    assert not list(tmp_path.iterdir())
