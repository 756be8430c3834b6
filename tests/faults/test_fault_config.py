"""Configs and command lines: each fault ends in one sentence naming the key path or file, exit code 2, before
anything is made (no run directory, no download, no model)."""
import json
from pathlib import Path

import pytest
import yaml

from esm_gearnet.config import render_config

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "config" / "demo" / "esm_gearnet.yaml"
EC = ROOT / "config" / "EC" / "esm_gearnet.yaml"


def _set(config, path, value):
    """config with the value at a dotted key path (`a.b[2].c`) replaced; `value=DELETE` removes the key."""
    *parents, last = path.replace("[", ".").replace("]", "").split(".")
    node = config
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if value is DELETE:
        del node[last]
    else:
        node[int(last) if isinstance(node, list) else last] = value
    return config


DELETE = object()

# (case, base config, key path, value, what the sentence must say)
CASES = [
    ("an int for a list", DEMO, "task.model.structure_model.hidden_dims", 64,
     "config key `task.model.structure_model.hidden_dims` must be a list of integers, got 64."),
    ("text for an int, deep in a list", DEMO, "task.graph_construction_model.edge_layers[2].k", "ten",
     "config key `task.graph_construction_model.edge_layers[2].k` must be an integer, got 'ten'."),
    ("a dataset without class", DEMO, "dataset.class", DELETE,
     "config key `dataset` must be a mapping with a `class:` entry."),
    ("an unknown engine key", DEMO, "engine.log_intervall", 10,
     "config key `engine.log_intervall` is unknown; did you mean log_interval"),
    ("text for the batch size", DEMO, "engine.batch_size", "eight",
     "config key `engine.batch_size` must be an integer, got 'eight'."),
    ("a batch size of 0", DEMO, "engine.batch_size", 0, "config key `engine.batch_size` must be at least 1, got 0."),
    ("text for the epochs", DEMO, "train.num_epoch", "five", "config key `train.num_epoch` must be an integer, got 'five'."),
    ("an unknown train key", DEMO, "train.num_epochs", 3, "config key `train.num_epochs` is unknown; did you mean num_epoch or num_step?"),
    ("batch_per_epoch 0", DEMO, "train.batch_per_epoch", 0, "config key `train.batch_per_epoch` must be at least 1, got 0."),
    ("text for the learning rate", DEMO, "optimizer.lr", "fast", "config key `optimizer.lr` must be a number, got 'fast'."),
    ("1e-4, which YAML reads as text", DEMO, "optimizer.lr", "1e-4", "(YAML reads a number without a decimal point"),
    ("a negative learning rate", DEMO, "optimizer.lr", -0.1,
     "config key `optimizer`: Adam refuses its arguments: Invalid learning rate: -0.1"),
    ("a plateau factor of 6.0", DEMO, "scheduler.factor", 6.0,
     "config key `scheduler`: ReduceLROnPlateau refuses its arguments: Factor should be < 1.0."),
    ("a misspelled top-level key", DEMO, "sequence_model_lr_ratoi", 0.1,
     "config key `sequence_model_lr_ratoi` is unknown; did you mean sequence_model_lr_ratio"),
    ("a negative learning-rate ratio", DEMO, "sequence_model_lr_ratio", -1,
     "config key `sequence_model_lr_ratio` must be at least 0, got -1."),
    ("an unknown class", DEMO, "task.model.structure_model.class", "GearNett",
     "config key `task.model.structure_model.class`: unknown class 'GearNett'; did you mean GearNet"),
    ("an unknown model argument", DEMO, "task.model.structure_model.hiden_dims", [8],
     "config key `task.model.structure_model`: GearNet got unknown argument 'hiden_dims' (did you mean 'hidden_dims'?)"),
    ("a TorchDrug feature the encoders do not make", EC, "dataset.residue_feature", "symbol",
     "config key `dataset.residue_feature` must be one of 'default', got 'symbol'."),
    ("an unknown dataset argument", EC, "dataset.atom_featur", None,
     "EnzymeCommission got unknown argument 'atom_featur' (did you mean 'atom_feature'?)"),
    ("a GO branch that is none", ROOT / "config" / "GO" / "esm_gearnet.yaml", "dataset.branch", "XX",
     "config key `dataset.branch` must be one of 'MF', 'BP', 'CC', got 'XX'."),
]


@pytest.mark.parametrize("case,base,key,value,sentence", CASES, ids=[c[0] for c in CASES])
def test_config_fault_is_one_sentence_before_anything_is_made(cli, tmp_path, case, base, key, value, sentence):
    config = _set(yaml.safe_load(render_config(base)), key, value)
    config["output_dir"] = str(tmp_path / "runs")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    code, out, err = cli("downstream", "-c", tmp_path / "bad.yaml")
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and sentence in err, err  # not even a log line
    assert not (tmp_path / "runs").exists()  # no run directory for a config that cannot run


def test_go_config_without_branch_names_the_option(cli, tmp_path, monkeypatch):
    """Before any download: the variable the config left null, and what it takes."""
    import urllib.request

    monkeypatch.setattr(urllib.request, "urlopen", None)  # any download attempt would fail loudly
    go = ROOT / "config" / "GO" / "esm_gearnet.yaml"
    code, _, err = cli("downstream", "-c", go, "--output_dir", tmp_path)
    assert code == 2 and err == (f"error: {go}: config key `dataset.branch` is {{{{ branch }}}}, which was not "
                                 "given; pass --branch (one of 'MF', 'BP', 'CC').\n")
    assert not any(tmp_path.iterdir())


JINJA_CASES = [
    ("an unknown filter", "{{ num_epoch | nosuch }}", "line {line}: Jinja template error: No filter named 'nosuch'."),
    ("an undefined attribute", "{{ num_epoch.value }}",
     "line {line}: the Jinja template fails while rendering (UndefinedError: 'None' has no attribute 'value')"),
    ("a division by zero", "{{ 5 / 0 }}",
     "line {line}: the Jinja template fails while rendering (ZeroDivisionError: division by zero)"),
]


@pytest.mark.parametrize("case,expression,sentence", JINJA_CASES, ids=[c[0] for c in JINJA_CASES])
def test_jinja_fault_names_the_file_and_line(cli, tmp_path, case, expression, sentence):
    lines = DEMO.read_text().splitlines()
    line = next(i for i, text in enumerate(lines) if text.strip().startswith("num_epoch:")) + 1
    lines[line - 1] = f"  num_epoch: {expression}"
    (tmp_path / "bad.yaml").write_text("\n".join(lines) + "\n")
    for command in ("downstream", "pretrain"):
        code, _, err = cli(command, "-c", tmp_path / "bad.yaml")
        assert code == 2 and err == f"error: {tmp_path / 'bad.yaml'}, " + err.split(", ", 1)[1]
        assert sentence.format(line=line) in err and err.count("\n") == 1, err


def test_download_error_is_one_sentence(cli, tmp_path, monkeypatch):
    """Every real config starts with a download; without network that is one sentence, not a traceback."""
    import urllib.request

    def offline(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    config = yaml.safe_load(render_config(EC))
    config.update(output_dir=str(tmp_path / "runs"))
    config["dataset"]["path"] = str(tmp_path / "data")
    # random ESM weights: the ESM-2-650M file is absent here, and missing weights are refused before a download
    model = config["task"]["model"]
    model["sequence_model"].update(pretrained=False, architecture=[1, 32, 4])
    model["structure_model"].pop("input_dim")
    (tmp_path / "ec.yaml").write_text(yaml.safe_dump(config))
    code, _, err = cli("downstream", "-c", tmp_path / "ec.yaml")
    err = err.splitlines()[-1]  # after the log lines of the run
    assert code == 2
    assert err.startswith("error: cannot download https://zenodo.org/record/6622158/files/EnzymeCommission.zip "
                          "(Network is unreachable); download it by hand and put it at "), err
    # a failed start leaves no run behind: the run directory its set-up made is gone (the sentence is on stderr)
    assert not list((tmp_path / "runs").rglob("*")), list((tmp_path / "runs").rglob("*"))


def test_missing_language_model_weights_are_found_before_anything_is_made(cli, tmp_path, monkeypatch):
    """The real EC config names ESM-2-650M's file, absent here: one sentence before any download or run
    directory, not after preprocessing the dataset."""
    import urllib.request

    def offline(*args, **kwargs):
        raise AssertionError("a download was tried")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    config = yaml.safe_load(render_config(EC))
    config.update(output_dir=str(tmp_path / "runs"))
    config["dataset"]["path"] = str(tmp_path / "data")
    config["task"]["model"]["sequence_model"]["path"] = str(tmp_path / "weights")
    (tmp_path / "ec.yaml").write_text(yaml.safe_dump(config))
    code, _, err = cli("downstream", "-c", tmp_path / "ec.yaml")
    assert code == 2
    assert err.strip() == (f"error: ESM weights esm2_t33_650M_UR50D.pt not found in {tmp_path / 'weights'}; download "
                           "https://dl.fbaipublicfiles.com/fair-esm/models/esm2_t33_650M_UR50D.pt into that folder "
                           "(or set `path:`), or set `pretrained: false` for random weights."), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ec.yaml"]


def _demo(tmp_path, **changes):
    config = yaml.safe_load(render_config(DEMO, {"num_protein": 40, "batch_size": 4}))
    config["output_dir"] = str(tmp_path / "runs")
    for key, value in changes.items():
        _set(config, key, value)
    (tmp_path / "demo.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return tmp_path / "demo.yaml"


def test_misspelled_metric_is_refused_before_training(cli, tmp_path):
    code, _, err = cli("downstream", "-c", _demo(tmp_path, metric="f1max"))
    assert code == 2 and err.splitlines()[-1] + "\n" == ("error: config key `metric`: MultipleBinaryClassification reports no 'f1max'; "
                                 "its validation metrics are auprc@micro, f1_max.\n")
    assert not list((tmp_path / "runs").rglob("*"))  # nothing trained: no run is left behind


def test_batch_per_epoch_limits_the_optimizer_steps(cli, tmp_path):
    """The original's train.batch_per_epoch: each epoch takes the first batches of that epoch's order."""
    config = _demo(tmp_path, **{"train.num_epoch": 2, "train.batch_per_epoch": 3,
                                "task.model.structure_model.hidden_dims": [16]})
    code, _, err = cli("downstream", "-c", config)
    assert code == 0, err
    metrics = next((tmp_path / "runs").rglob("metrics.jsonl"))
    epochs = [json.loads(line) for line in metrics.read_text().splitlines() if '"epoch"' in line]
    assert [r["step"] for r in epochs if "train" in r] == [3, 6]  # 32 training proteins are 8 batches of 4


@pytest.mark.parametrize("make", [lambda d: (d / "empty.pth").touch() or d / "empty.pth", lambda d: d / "missing.pth",
                                  lambda d: d], ids=["empty", "missing", "a directory without best/last.pth"])
def test_weights_named_by_ckpt_are_found_before_anything_is_made(cli, tmp_path, make):
    weights = make(tmp_path)
    code, _, err = cli("downstream", "-c", _demo(tmp_path), "--ckpt", weights)
    assert code == 2 and err.startswith("error: ") and str(weights) in err and err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists()
