"""engine.strategy: fsdp (FSDP2) on CPU ranks with gloo: equal to one process and to ddp for every fusion mode and
structure encoder, sharded checkpoints (resharded for another world size, kill -9 and resume, checked shard by
shard), and embed / predict / --ckpt / consolidate reading a sharded run."""
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import STRUCTURES, run_command, run_dir_of
from esm_gearnet import checkpoint
from esm_gearnet.engine import Engine

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "fsdp_equality.py"
DEMO = ROOT / "config" / "demo" / "esm_gearnet.yaml"
SMALL = ["--num_protein", "24", "--batch_norm", "False"]  # train 19, valid 2, test 3


def _env(weights=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    if weights:
        env["FSDP_EQUALITY_WEIGHTS"] = str(weights)
    env.pop("WORLD_SIZE", None)
    return env


def _launch(ranks, *command, timeout=600, weights=None):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    result = run_command(launcher + [str(c) for c in command], timeout, cwd=ROOT, env=_env(weights))
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return tmp_path_factory.mktemp("weights")  # a fair-esm file in fp16, written by the single-process run


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, weights):
    out = tmp_path_factory.mktemp("one") / "one.pt"
    result = run_command([sys.executable, str(WORKER), str(out)], 300, cwd=ROOT, env=_env(weights))
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(out)


@pytest.fixture(scope="module")
def saved_by_four(tmp_path_factory, weights):
    """A sharded last.pth written by 4 ranks (gearnet_series, 5 steps) and what it holds, whole."""
    folder = tmp_path_factory.mktemp("four")
    _launch(4, WORKER, "save", folder, weights=weights)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [2, 4])
def test_fsdp_and_ddp_equal_one_process_for_every_fusion_and_encoder(one_process, saved_by_four, ranks, tmp_path,
                                                                     weights):
    """One launch per world size runs every variant under ddp and fsdp: 5 steps of fp32 training on the same
    global batches (clipped; one variant through the engine's loop with gradient accumulation, activation
    checkpointing and the varlen path, one with a frozen language model, one from a fair-esm file in fp16, which
    fsdp casts unit by unit, two with LoRA adapters, two with ESM C), losses and parameters within 1e-5 of one
    process; then (2 ranks) the 4-rank sharded checkpoint is resharded: weights, optimizer state and step exactly as
    saved."""
    out = tmp_path / "ranks.pt"
    _launch(ranks, WORKER, out, weights=weights)
    results = torch.load(out)
    assert len(results) == 2 * len(one_process) == 24
    for key, result in results.items():
        reference = one_process[key.split("/")[0] + "/ddp"]
        assert len(reference["losses"]) == 1 or reference["losses"][0] != reference["losses"][-1]  # it trained
        np.testing.assert_allclose(result["losses"], reference["losses"], atol=1e-5, rtol=0, err_msg=key)
        assert set(result["state"]) == set(reference["state"]), key
        for name, value in reference["state"].items():
            # under fsdp a file's fp16 weights are kept until sharded, and peft creates adapters in their base's
            # dtype: their random start is rounded to fp16 (then trained in fp32)
            rounded = "lora_fp16_file/fsdp" in key and "lora_A" in name
            torch.testing.assert_close(result["state"][name].float(), value.float(), atol=1e-4 if rounded else 1e-5,
                                       rtol=0, msg=f"{key} {name}")
    if ranks == 2:
        _launch(2, WORKER, "load", saved_by_four, weights=weights)
        saved, loaded = torch.load(saved_by_four / "expected.pt"), torch.load(saved_by_four / "loaded-2.pt")
        assert saved["step"] == loaded["step"] == 5
        for name, value in saved["model"].items():
            assert torch.equal(loaded["model"][name], value), name
        for name, moments in saved["optimizer"].items():
            for key, value in moments.items():
                assert torch.equal(torch.as_tensor(loaded["optimizer"][name][key]), torch.as_tensor(value))


def _downstream(*options):
    return [sys.executable, "script/downstream.py", "-c", str(DEMO), *SMALL, "--batch_size", "2",
            "--engine.strategy", "fsdp", *options]


def _killed(command, epoch):
    """`command` under torchrun with 4 ranks, every rank SIGKILLed where it would write last.pth of `epoch`."""
    wrapper = Path(command[-1]).parent / "kill_before_checkpoint.py"
    from conftest import KILL_BEFORE_CHECKPOINT
    wrapper.write_text(KILL_BEFORE_CHECKPOINT)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4"]
    return run_command(launcher + [str(wrapper), str(epoch), *command[1:]], 600, cwd=ROOT, env=_env())


def _weights(run_dir):
    return checkpoint.task_state(checkpoint.load(run_dir / "last.pth"))


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    """A finished fine-tuning run of 2 epochs under fsdp with 4 ranks: best.pth and last.pth are folders."""
    out = tmp_path_factory.mktemp("sharded")
    _launch(4, *_downstream("--num_epoch", "2", "--output_dir", out)[1:])
    return run_dir_of(out)


@pytest.mark.slow
def test_kill_9_under_fsdp_resumes_with_4_ranks_exactly_and_with_2_at_the_saved_step(sharded_run, tmp_path):
    cut = tmp_path / "cut"
    command = _downstream("--num_epoch", "2", "--output_dir", cut)
    killed = _killed(command, 2)
    assert killed.returncode != 0 and "SIGKILL" in killed.stderr, killed.stderr[-3000:]
    run_dir = run_dir_of(cut)
    saved = checkpoint.load(run_dir / "last.pth", verify=False)
    assert saved["epoch"] == 1 and saved["sharded"]["world_size"] == 4
    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    _launch(4, "script/downstream.py", "--resume", run_dir)
    a, b = _weights(sharded_run), _weights(run_dir)
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # with 2 ranks: the same weights at the saved step, then epoch 2 at 2 x 2 proteins a step
    resumed = _launch(2, "script/downstream.py", "--resume", other)
    step = saved["training"]["step"]  # 3: 19 proteins in batches of 2 on 4 ranks
    assert f"resumed a run of 4 process(es) with 2 at step {step}" in resumed.stderr
    state = checkpoint.load(other / "last.pth", verify=False)
    assert state["epoch"] == 2 and state["training"]["step"] == step + 5 and state["sharded"]["world_size"] == 2
    records = [json.loads(line) for line in (other / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if "epoch" in r] == [1, 2]


def _cli(*args):
    return run_command([sys.executable, "-m", "esm_gearnet", *map(str, args)], 300, cwd=ROOT, env=_env())


@pytest.mark.slow
def test_embed_predict_and_ckpt_read_a_sharded_run_as_its_consolidated_file(sharded_run, tmp_path):
    assert checkpoint.is_folder(sharded_run / "best.pth") and checkpoint.is_folder(sharded_run / "last.pth")
    result = _cli("consolidate", sharded_run, "-o", tmp_path / "best.pth")
    assert result.returncode == 0, result.stderr
    proteins = [STRUCTURES / "1ORC-A.pdb", STRUCTURES / "1D66-A.pdb"]
    for source, name in ((sharded_run, "folder"), (tmp_path / "best.pth", "file")):
        assert _cli("embed", "--ckpt", source, *proteins, "-o", tmp_path / f"{name}.npz", "--quiet").returncode == 0
        assert _cli("predict", "--ckpt", source, *proteins, "-o", tmp_path / f"{name}.csv").returncode == 0
    folder, file = np.load(tmp_path / "folder.npz"), np.load(tmp_path / "file.npz")
    assert np.array_equal(folder["embedding"], file["embedding"])
    assert (tmp_path / "folder.csv").read_text() == (tmp_path / "file.csv").read_text()
    # --ckpt: the encoder of a sharded checkpoint, read in every process
    from esm_gearnet.commands.run import encoder_weights

    encoder, _ = encoder_weights(sharded_run / "last.pth")
    assert encoder.keys() == checkpoint.load(tmp_path / "best.pth")["encoder"].keys()
    # the original's layout: the encoder's bare state_dict
    assert _cli("consolidate", sharded_run / "last.pth", "--encoder-only", "-o", tmp_path / "bare.pth").returncode == 0
    bare = torch.load(tmp_path / "bare.pth", weights_only=True)
    assert all(torch.equal(bare[k], encoder[k]) for k in encoder)


@pytest.mark.slow
def test_a_sharded_checkpoint_resumed_by_a_run_that_cannot_use_it_is_one_sentence(sharded_run, tmp_path, cli):
    copy = tmp_path / "run"
    shutil.copytree(sharded_run, copy)
    code, _, err = cli("downstream", "--resume", copy, "--train.num_epoch", "3")  # refused before anything is built
    assert code == 2 and "is a sharded checkpoint of 4 processes (engine.strategy: fsdp); resume it with several " \
        "processes under torchrun" in err and "DemoFolds" not in err, err
    for override, words in ((["--engine.strategy", "ddp"], "was written under engine.strategy fsdp but this run is "
                             "ddp; resume with engine.strategy fsdp"),
                            (["--task.num_mlp_layer", "3"], "does not fit this run's model (ValueError: Size mismatch "
                             "between saved")):
        result = run_command([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              "script/downstream.py", "--resume", str(copy), *override, "--train.num_epoch", "3"],
                             300, cwd=ROOT, env=_env())
        assert result.returncode != 0  # torchrun's own code; each rank ended with its sentence and exit code 2
        assert words in result.stderr and "]: Traceback" not in result.stderr, result.stderr[-3000:]  # no rank's


# ---- in one process ------------------------------------------------------------------------------------------
def _folder(tmp_path, seed=0):
    """A sharded checkpoint written by one process (the layout every rank count writes) of a small module."""
    torch.manual_seed(seed)
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    state = {"model": {f"encoder.{k}": v for k, v in module.state_dict().items()}}
    path = tmp_path / f"run{seed}" / "best.pth"
    path.parent.mkdir()
    checkpoint.save_folder(state, checkpoint.pack(None, {"task": {}}, ["a"], epoch=3), path)
    return path, state["model"]


def test_a_sharded_checkpoint_reads_back_whole(tmp_path):
    path, model = _folder(tmp_path)
    assert sorted(p.name for p in path.iterdir()) == [".metadata", "__0_0.distcp", "meta.pth"]
    state = checkpoint.load(path)
    assert state["epoch"] == 3 and state["task_names"] == ["a"] and state["training"] is None
    assert all(torch.equal(state["encoder"][k[len("encoder."):]], v) for k, v in model.items())
    assert checkpoint.locate(path.parent) == path  # a run directory's best.pth folder
    # written again: the new folder replaces the old one, nothing left beside it
    checkpoint.save_folder({"model": model}, checkpoint.pack(None, {}, epoch=4), path)
    assert checkpoint.load(path)["epoch"] == 4 and sorted(p.name for p in path.parent.iterdir()) == ["best.pth"]


@pytest.mark.parametrize("damage, words", [
    ("missing", "lacks __0_0.distcp, written by one of the 1 ranks that saved it (a rank's shard is missing)"),
    ("truncated", "were written (truncated)"),
    ("mixed", "whose content differs from what was written (a shard of another checkpoint?)"),
    ("metadata", "holds .metadata whose content differs"),
])
def test_a_damaged_sharded_checkpoint_is_one_sentence_and_nothing_is_loaded(tmp_path, damage, words):
    path, _ = _folder(tmp_path)
    shard = path / "__0_0.distcp"
    if damage == "missing":
        shard.unlink()
    elif damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:-10])
    elif damage == "mixed":  # the same shard of another run, of the same size
        other, _ = _folder(tmp_path, seed=1)
        shutil.copy(other / "__0_0.distcp", shard)
    else:
        (path / ".metadata").write_bytes((path / ".metadata").read_bytes()[:-1] + b"\0")
    with pytest.raises(checkpoint.CheckpointError) as error:
        checkpoint.load(path)
    message = str(error.value)
    assert message.startswith(f"sharded checkpoint {path} ") and words in message and "nothing was loaded" in message
    assert message.count(". ") == 0 and "\n" not in message
    from esm_gearnet.commands.consolidate import consolidate
    with pytest.raises(checkpoint.CheckpointError):
        consolidate(path, tmp_path / "out.pth")
    assert not (tmp_path / "out.pth").exists()


def test_a_replacement_cut_off_leaves_the_previous_checkpoint_readable(tmp_path):
    path, _ = _folder(tmp_path)
    path.rename(path.parent / ".best.pth.old")  # killed between putting the old one aside and the new in place
    assert checkpoint.locate(path.parent) == path.parent / ".best.pth.old"
    assert checkpoint.load(checkpoint.locate(path.parent))["epoch"] == 3


def test_fp16_is_refused_under_fsdp_in_one_sentence():
    task = torch.nn.Linear(2, 2)
    with pytest.raises(Exception, match=r"config key `engine.precision`: fp16 does not shard"):
        Engine(task, [], None, None, torch.optim.Adam(task.parameters()), strategy="fsdp", precision="fp16",
               progress=False)


def test_fsdp_with_one_process_is_the_plain_run():
    task = torch.nn.Linear(2, 2)
    parameters = list(task.parameters())
    engine = Engine(task, [], None, None, torch.optim.Adam(parameters), strategy="fsdp", progress=False)
    assert not engine.sharded and engine.model is engine.task is task
    assert list(task.parameters()) == parameters  # nothing replaced: the optimizer's parameters are the task's


def test_consolidate_refuses_what_is_not_a_sharded_checkpoint_in_one_sentence(tmp_path, cli):
    code, _, err = cli("consolidate", tmp_path / "nowhere")
    assert code == 2 and f"{tmp_path / 'nowhere'} does not exist" in err
    file = tmp_path / "best.pth"
    checkpoint.save_atomic(checkpoint.pack(torch.nn.Linear(2, 2), {}), file)
    code, _, err = cli("consolidate", file)
    assert code == 2 and "is not a sharded checkpoint" in err and "a .pth file is already one file" in err
