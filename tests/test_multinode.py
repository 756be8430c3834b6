"""Multi-node training through torchrun's c10d rendezvous: two "nodes" of one process each on this machine, started
as two separate `torch.distributed.run --nnodes 2` launchers that find each other at one endpoint, as two machines
would (docs/scale.md: "Several machines"), train to the result of one process over the same global batches."""
import subprocess
import sys
import time

import pytest

from conftest import run_dir_of
from test_engine import DEMO, ROOT, SMALL, _assert_same_weights, _env, _free_port, _records, _run
from esm_gearnet import checkpoint


def _script(*options):
    return ["script/downstream.py", "-c", str(DEMO), *SMALL, "--num_epoch", "1", *options]


def _node(port: int, out) -> subprocess.Popen:
    """One "node": a torchrun launcher of one process joining the two-node rendezvous at 127.0.0.1:port."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes",
               *_script("--batch_size", "4", "--output_dir", str(out))]
    return subprocess.Popen(command, cwd=ROOT, env=_env(), start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish_together(processes, timeout: float):
    """Every process's (return code, stderr) once all have ended; when one fails the others are killed (they would
    wait for it in a collective), and at the timeout all are."""
    import os
    import signal

    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in processes):
        failed = any(p.poll() not in (None, 0) for p in processes)
        if failed or time.monotonic() > deadline:
            for p in processes:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
            if not failed:
                pytest.fail(f"the two nodes did not end within {timeout:g} s")
        time.sleep(0.2)
    return [(p.returncode, p.communicate()[1]) for p in processes]


@pytest.mark.slow
def test_two_nodes_through_the_c10d_rendezvous_match_one_process(tmp_path):
    """2 nodes x 1 process x batch 4, joined through c10d at one endpoint, average gradients over the same global
    batches as 1 process x batch 8: equal records and weights after one epoch."""
    single = tmp_path / "single"
    one = _run([sys.executable, *_script("--batch_size", "8", "--output_dir", str(single))], single)
    out = tmp_path / "two_nodes"
    port = _free_port()
    ended = _finish_together([_node(port, out), _node(port, out)], 300)
    for code, stderr in ended:
        assert code == 0, stderr[-3000:]
    two = run_dir_of(out)
    a, b = _records(one), _records(two)
    assert len(a) == len(b) == 2 and "final" in b[-1]
    assert b[0]["num_evaluated"] == {"valid": 5, "test": 5}
    assert b[0]["train"]["loss"] == pytest.approx(a[0]["train"]["loss"], abs=1e-4)
    for split in ("valid", "test"):
        for key, value in a[0][split].items():
            assert b[0][split][key] == pytest.approx(value, abs=1e-4), (split, key)
    _assert_same_weights(checkpoint.task_state(checkpoint.load(one / "last.pth")),
                         checkpoint.task_state(checkpoint.load(two / "last.pth")), atol=1e-4)
    assert "world_size" in checkpoint.load(two / "last.pth")["training"]
    assert checkpoint.load(two / "last.pth")["training"]["world_size"] == 2
