"""Config rendering, command-line variables and the registry's error messages."""
import re
from pathlib import Path

import pytest
import torch

from esm_gearnet.commands.arguments import base_parser, downstream_parser, parse_args
from esm_gearnet.config import ConfigError, detect_variables, literal, load_config, render_config
from esm_gearnet.registry import build, resolve

CONFIG = Path(__file__).resolve().parents[1] / "config"


def test_original_go_config_renders_with_branch_and_ckpt():
    path = str(CONFIG / "GO" / "esm_gearnet.yaml")
    # `# model_checkpoint: {{ ckpt }}` is a YAML comment: no variable of the config (--ckpt is the script's own)
    assert detect_variables(path) == {"branch"}
    args, variables, overrides = parse_args(["-c", path, "--branch", "MF", "--ckpt", "~/w/mc_esm_gearnet.pth",
                                             "-s", "7"], downstream_parser("test"))
    assert overrides == []
    assert args.seed == 7 and args.ckpt == "~/w/mc_esm_gearnet.pth" and variables == {"branch": "MF"}
    config = load_config(path, variables)
    assert config.dataset.branch == "MF"
    assert config.task.model.structure_model.hidden_dims == [512] * 6
    assert config.engine.gpus == [0, 1, 2, 3] and config.optimizer.lr == 1e-4
    assert "model_checkpoint" not in config  # commented out in the original file, as there


def test_variables_not_given_render_as_null_and_values_are_literals(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model_checkpoint: {{ ckpt }}\nbranch: {{ branch }}\nsize: {{ size }}\ndims: {{ dims }}\n")
    args, variables, _ = parse_args(["-c", str(path), "--size", "3", "--dims", "[1, 2]"], base_parser())
    assert variables == {"ckpt": None, "branch": None, "size": 3, "dims": [1, 2]}
    config = load_config(str(path), variables)
    assert config.model_checkpoint is None and config.branch is None
    assert config.size == 3 and config.dims == [1, 2]
    assert literal("0.1") == 0.1 and literal("None") is None and literal("MF") == "MF"
    assert literal("~/a/b.pth") == "~/a/b.pth"


def test_unknown_command_line_option_names_the_closest(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("branch: {{ branch }}\nengine:\n  batch_size: 2\n")
    args, variables, overrides = parse_args(["-c", str(path), "--brnch", "MF"], base_parser())
    with pytest.raises(ConfigError, match=r"option --brnch is neither .* did you mean --branch\?"):
        load_config(str(path), variables, overrides)


def test_config_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("task:\n  class: GearNet\n   hidden: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml, line \d+: not valid YAML"):
        load_config(str(bad_yaml))
    bad_jinja = tmp_path / "bad_jinja.yaml"
    bad_jinja.write_text("a: {{ b \n")
    with pytest.raises(ConfigError, match=r"bad_jinja\.yaml, line 1: Jinja"):
        load_config(str(bad_jinja))


def test_every_original_class_name_of_the_data_layer_resolves():
    config = load_config(str(CONFIG / "EC" / "esm_gearnet.yaml"))
    graph = build(config.task.graph_construction_model, "task.graph_construction_model")
    assert [type(layer).__name__ for layer in graph.edge_layers] == ["SequentialEdge", "SpatialEdge", "KNNEdge"]
    transform = build(config.dataset.transform, "dataset.transform")
    assert [type(t).__name__ for t in transform.transforms] == ["ProteinView", "TruncateProtein"]
    assert resolve("layers.GraphConstruction").__name__ == "GraphConstruction"  # dotted TorchDrug names
    optimizer = build(config.optimizer, "optimizer", params=[torch.nn.Parameter(torch.zeros(2))])
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.defaults["lr"] == 1e-4
    scheduler = build(config.scheduler, "scheduler", optimizer=optimizer)
    assert isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)


def test_unknown_class_lists_the_closest_names():
    with pytest.raises(ConfigError) as info:
        build({"class": "SpatialEgde", "radius": 10.0}, "task.graph_construction_model.edge_layers[1]")
    message = str(info.value)
    assert "task.graph_construction_model.edge_layers[1].class" in message and "SpatialEdge" in message


def test_misspelled_and_missing_arguments_name_the_key_the_class_and_its_arguments():
    with pytest.raises(ConfigError) as info:
        build({"class": "GraphConstruction", "edge_layers": [{"class": "KNNEdge", "kk": 10}]}, "task.graph")
    message = str(info.value)
    assert "task.graph.edge_layers[0]" in message and "KNNEdge" in message
    assert "'kk'" in message and "did you mean 'k'" in message and "min_distance" in message
    with pytest.raises(ConfigError, match=r"`optimizer`: Adam needs argument 'params'"):
        build({"class": "Adam", "lr": 1e-3}, "optimizer")
    with pytest.raises(ConfigError, match="must be a mapping with a `class:` entry"):
        build({"radius": 3}, "task.model")


RENDERS = Path(__file__).resolve().parent / "data" / "config_renders.json"
GIVEN = {"branch": "MF", "ckpt": "runs/pretrained/mc_esm_gearnet.pth", "batch_size": 4, "num_epoch": 3,
         "num_protein": 16, "output_dir": "runs", "fix_sequence_model": True, "batch_norm": False}


def test_every_config_renders_as_before_the_sandbox():
    """config_renders.json holds every config under config/ as the renderer before the sandbox rendered it, with
    no variables ("none") and with GIVEN's values for the config's own variables ("given"); a new config is
    added to it deliberately."""
    import json

    expected = json.loads(RENDERS.read_text())
    root = CONFIG.parent
    configs = sorted(str(p.relative_to(root)) for p in CONFIG.rglob("*.yaml"))
    assert configs == sorted(expected)
    for name in configs:
        path = str(root / name)
        text = Path(path).read_text()  # every variable the template uses, comment lines included, as recorded
        given = {k: v for k, v in GIVEN.items() if re.search(r"\{\{[^}]*\b" + k + r"\b", text)}
        assert render_config(path) == expected[name]["none"], name
        assert render_config(path, given) == expected[name]["given"], name
