"""The command line around the happy path: help, key overrides on all four commands, --resume RUN_DIR alone,
the output of a run (epoch numbering, readable lines, the last line), report labels and engine.logger."""
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import run_dir_of


ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "config" / "demo" / "esm_gearnet.yaml"
PRETRAIN = ROOT / "config" / "demo" / "pretrain_mc_esm_gearnet.yaml"
# a small demo run: 32 proteins, one GearNet layer of 16
SMALL = ["--num_protein", "32", "--batch_size", "8", "--task.model.structure_model.hidden_dims", "[16]"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One epoch of the demo, set up only through overrides; (run directory, stderr)."""
    from esm_gearnet.commands.main import main
    import contextlib
    import io

    output = tmp_path_factory.mktemp("runs")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main([str(a) for a in ["downstream", "-c", DEMO, "--output_dir", output, *SMALL, "--train.num_epoch", "1",
                     "--engine.log_interval", "2", "--optimizer.lr", "5e-3"]])
    assert code == 0, err.getvalue()
    return run_dir_of(output), err.getvalue()


def test_help_goes_to_stdout(cli):
    code, out, err = cli("--help")
    assert code == 0 and "esm-gearnet embed" in out and err == ""
    for command in ("embed", "predict", "report"):
        code, out, _ = cli(command, "--help")
        assert code == 0 and "usage:" in out
    code, out, _ = cli("downstream", "-c", DEMO, "--help")
    assert code == 0 and "--config" in out
    assert f"options of {DEMO} (its Jinja variables):" in out
    for name in ("--batch_norm VALUE", "--batch_size VALUE", "--num_epoch VALUE", "--num_protein VALUE",
                 "--output_dir VALUE", "--KEY.PATH VALUE", "--engine.batch_size 4"):
        assert name in out
    code, _, err = cli()
    assert code == 2 and "no command given; name one of: embed" in err
    code, _, err = cli("foo")
    assert code == 2 and "unknown command 'foo'" in err
    code, out, _ = cli("--version")
    assert code == 0 and out.startswith("esm-gearnet ")
    for command in ("embed", "predict", "report", "downstream", "pretrain"):
        code, out, _ = cli(command, "--help")
        assert out.startswith(f"usage: esm-gearnet {command} ")
        if command in ("embed", "predict"):
            assert "its suffix chooses the format" in out  # -o has its line of help
    code, out, _ = cli("downstream", "-c", ROOT / "config" / "EC" / "esm_gearnet_cross.yaml", "--help")
    assert "--ckpt VALUE" not in out  # `# model_checkpoint: {{ ckpt }}` is a comment, not an option


def test_overrides_are_applied_and_saved(demo_run):
    run_dir, err = demo_run
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["task"]["model"]["structure_model"]["hidden_dims"] == [16]
    assert config["train"]["num_epoch"] == 1 and config["optimizer"]["lr"] == 5e-3  # 5e-3 read as a number
    assert config["dataset"]["num_protein"] == 32 and config["engine"]["log_interval"] == 2


def test_a_run_reports_in_readable_lines(demo_run):
    run_dir, err = demo_run
    log = (run_dir / "log.txt").read_text()
    assert "epoch 1 step 2 loss " in log  # the step lines count epochs from 1, as metrics.jsonl does
    epoch_line = next(line for line in log.splitlines() if "epoch 1; train loss" in line)
    valid = epoch_line.split("; valid ")[1].split(";")[0]
    for item in valid.split(", "):  # 4 significant digits at most
        digits = item.split(" ")[1].lstrip("0.").replace(".", "")
        assert len(digits.rstrip("e-0123456789") or digits) <= 4 or "e" in item, item
    last = err.strip().splitlines()[-1]
    assert f"run directory {run_dir}" in last and "best validation epoch 1" in last
    assert str(run_dir / "curves.png") in last and "f1_max" in last
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["epoch"] == 1 and records[0]["best_epoch"] == 1


def test_unknown_key_path_names_the_closest(cli, tmp_path):
    code, _, err = cli("downstream", "-c", DEMO, "--output_dir", tmp_path, "--engine.batchsize", "4")
    assert code == 2 and err.startswith("error: config key `engine.batchsize` is unknown; did you mean batch_size")
    code, _, err = cli("downstream", "-c", DEMO, "--output_dir", tmp_path, "--engin.batch_size", "4")
    assert code == 2 and "option --engin.batch_size is neither an option of the script" in err
    assert "did you mean --engine.batch_size" in err
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_resume_run_dir_alone_continues_with_its_own_config(demo_run, cli, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(demo_run[0], run_dir)
    code, _, err = cli("downstream", "--resume", run_dir, "--train.num_epoch", "2")
    assert code == 0, err
    epochs = [json.loads(line).get("epoch") for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e for e in epochs if e] == [1, 2]
    code, _, err = cli("downstream", "--resume", tmp_path)
    assert code == 2 and "holds no config.yaml" in err


def test_embed_and_predict_take_overrides(demo_run, cli, tmp_path, structures_dir):
    run_dir, _ = demo_run
    files = sorted(structures_dir.glob("*.pdb"))[:2]
    code, _, err = cli("predict", "--ckpt", run_dir, *files, "-o", tmp_path / "a.csv", "--scores", tmp_path / "a.npz",
                       "--quiet")
    assert code == 0, err
    # fair-esm's own attention instead of SDPA: the same predictions
    code, _, err = cli("predict", "--ckpt", run_dir, *files, "-o", tmp_path / "b.csv", "--scores",
                       tmp_path / "b.npz", "--quiet", "--task.model.sequence_model.attention", "esm")
    assert code == 0, err
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert np.abs(a["scores"] - b["scores"]).max() < 1e-4
    # embed: the variables and a key path of the config, the inputs after them
    code, _, err = cli("embed", "-c", DEMO, "--task.model.structure_model.hidden_dims", "[8, 8]", *files,
                       "-o", tmp_path / "e.npz", "--quiet")
    assert code == 0, err
    assert np.load(tmp_path / "e.npz")["embedding"].shape == (2, 64 + 16)  # ESM 64 and concat_hidden 8 + 8
    code, _, err = cli("embed", "-c", DEMO, "--task.model.structur_model.hidden_dims", "[8]", *files, "-o",
                       tmp_path / "f.npz")
    assert code == 2 and "did you mean --task.model.structure_model.hidden_dims" in err


def test_pretrain_takes_overrides(cli, tmp_path):
    code, _, err = cli("pretrain", "-c", PRETRAIN, "--output_dir", tmp_path, "--num_protein", "8",
                       "--train.num_epoch", "1", "--task.model.model.structure_model.hidden_dims", "[8]",
                       "--engine.batch_size", "4")
    assert code == 0, err
    config = yaml.safe_load((run_dir_of(tmp_path) / "config.yaml").read_text())
    assert config["task"]["model"]["model"]["structure_model"]["hidden_dims"] == [8]
    assert (run_dir_of(tmp_path) / "model_epoch_1.pth").is_file()


def test_report_labels_and_default_output(demo_run, cli, tmp_path):
    import shutil

    first, second = tmp_path / "a", tmp_path / "b"
    shutil.copytree(demo_run[0], first)
    shutil.copytree(demo_run[0], second)
    config = yaml.safe_load((second / "config.yaml").read_text())
    config["optimizer"]["lr"] = 1e-3
    (second / "config.yaml").write_text(yaml.safe_dump(config))
    from esm_gearnet.engine.report import run_labels

    assert run_labels([first, second]) == ["lr=0.005", "lr=0.001"]  # what differs between the runs
    code, out, err = cli("report", first, second, "--label", "fast", "--label", "slow")
    assert code == 0 and (first / "report.png").is_file() and out.strip() == f"wrote {first / 'report.png'}"
    code, _, err = cli("report", first, second, "--label", "one")
    assert code == 2 and "1 label(s) for 2 run(s)" in err


def test_wandb_logger_offline(cli, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    runs, logged = [], []
    real_init = wandb.init

    def init(**kwargs):  # the real offline run, its log calls recorded
        run = real_init(**kwargs)
        real_log = run.log
        run.log = lambda data, step=None: logged.append((step, dict(data))) or real_log(data, step=step)
        runs.append(kwargs)
        return run

    monkeypatch.setattr(wandb, "init", init)
    code, _, err = cli("downstream", "-c", DEMO, "--output_dir", tmp_path, *SMALL, "--num_protein", "16",
                       "--train.num_epoch", "1", "--engine.logger", "wandb")
    assert code == 0, err
    run_dir = run_dir_of(tmp_path)
    assert len(runs) == 1 and runs[0]["dir"] == str(run_dir) and runs[0]["name"] == run_dir.name
    assert runs[0]["config"]["task"]["model"]["structure_model"]["hidden_dims"] == [16]
    assert [step for step, _ in logged] == [1] and {"train/loss", "valid/f1_max", "test/auprc@micro"} <= set(logged[0][1])
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


def test_under_torchrun_a_user_error_is_printed_by_rank_0_and_named_in_torchruns_error_file(cli, tmp_path,
                                                                                           monkeypatch):
    """Every rank meets a config's or a file's error alike: rank 0 prints the sentence, each rank writes it into
    the error file torchrun reads, so torchrun's failure summary names it as the root cause."""
    import json

    missing = tmp_path / "absent.pth"
    for rank in ("1", "0"):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / f"error{rank}.json"))
        code, _, err = cli("predict", "--ckpt", missing, tmp_path, "-o", tmp_path / "p.csv")
        assert code == 2
        record = json.loads((tmp_path / f"error{rank}.json").read_text())["message"]
        assert str(missing) in record["message"] and record["extraInfo"]["py_callstack"].startswith("error: ")
        assert (err == "") == (rank == "1"), err


def test_help_into_a_pipe_closed_early_is_no_error():
    """`esm-gearnet ... --help | head -1` and `python script/X.py --help | head -1`: the reader leaves after one
    line; no traceback, exit 0."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    for args in (["-m", "esm_gearnet", "--help"], ["-m", "esm_gearnet", "downstream", "--help"],
                 [str(root / "script" / "pretrain.py"), "--help"], [str(root / "script" / "embed.py"), "--help"]):
        process = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, bufsize=0)
        process.stdout.read(10)
        process.stdout.close()
        stderr = process.stderr.read().decode()
        assert process.wait(timeout=60) == 0 and "Traceback" not in stderr, stderr
