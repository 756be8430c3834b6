"""The config layout mapped onto the encoder contract (esm_gearnet/assembly/build.py): derived sizes and the sentence
for a disagreeing one, the Unsupervised nesting, learning-rate ratios and freezing, and the original's optimizer
groups behind `original_optimizer_groups`."""
import copy

import pytest
import torch
from easydict import EasyDict

from esm_gearnet.assembly import build_encoder, build_task, learning_rate_ratios, optimizer_groups
from esm_gearnet.config import ConfigError
from esm_gearnet.models import ESM, FusionNetwork, GearNet
from esm_gearnet.tasks import MultiviewContrast

GRAPH = {"class": "GraphConstruction", "node_layers": [{"class": "AlphaCarbonNode"}],
         "edge_layers": [{"class": "SequentialEdge", "max_distance": 2},
                         {"class": "SpatialEdge", "radius": 10.0, "min_distance": 5},
                         {"class": "KNNEdge", "k": 10, "min_distance": 5}]}
ESM_CFG = {"class": "ESM", "pretrained": False, "architecture": [1, 32, 4]}
GEARNET = {"class": "GearNet", "hidden_dims": [16, 16], "batch_norm": True, "concat_hidden": True}


def _config(model, task="MultipleBinaryClassification", **top):
    return EasyDict({"task": {"class": task, "model": copy.deepcopy(model), "graph_construction_model": GRAPH,
                              "num_mlp_layer": 2}, "optimizer": {"class": "Adam", "lr": 1e-3}, **top})


def _fusion(fusion="series", structure=GEARNET, **extra):
    return {"class": "FusionNetwork", "sequence_model": ESM_CFG, "structure_model": structure, "fusion": fusion,
            **extra}


def test_sizes_are_derived_from_the_sequence_model_and_the_graph():
    series = build_encoder(_config(_fusion("series")))
    assert isinstance(series, FusionNetwork) and series.structure_model.input_dim == 32  # ESM's width
    assert series.structure_model.num_relation == 7  # 5 sequential + spatial + knn
    assert build_encoder(_config(_fusion("parallel"))).structure_model.input_dim == 21
    alone = build_encoder(_config(GEARNET))
    assert isinstance(alone, GearNet) and alone.input_dim == 21 and alone.graph_construction_model is not None
    gvp = {"class": "GVPGNN", "node_in_dim": [32, 0], "node_h_dim": [16, 4], "edge_in_dim": [16, 1],
           "edge_h_dim": [8, 1], "num_layers": 1}
    assert build_encoder(_config(_fusion("series", gvp))).structure_model.input_dim == 32


def test_a_size_that_disagrees_gets_one_sentence():
    with pytest.raises(ConfigError, match=r"`task.model.structure_model.input_dim` is 1280 but the sequence model "
                                          r"\(task.model.sequence_model\) gives 32; remove the key"):
        build_encoder(_config(_fusion("series", {**GEARNET, "input_dim": 1280})))
    with pytest.raises(ConfigError, match=r"`task.model.num_relation` is 5 but task.graph_construction_model's "
                                          r"edge layers gives 7"):
        build_encoder(_config({**GEARNET, "num_relation": 5}))
    gvp = {"class": "GVPGNN", "node_in_dim": [1280, 0], "node_h_dim": [16, 4], "edge_in_dim": [16, 1],
           "edge_h_dim": [8, 1]}
    with pytest.raises(ConfigError, match=r"node_in_dim` is \[1280, 0\].*set node_in_dim\[0\] to 21"):
        build_encoder(_config(gvp))
    no_graph = _config(GEARNET)
    del no_graph.task["graph_construction_model"]
    with pytest.raises(ConfigError, match="reads the residue graph's edges but the config has no "
                                          "task.graph_construction_model"):
        build_encoder(no_graph)
    with pytest.raises(ConfigError, match="is not an encoder"):
        build_encoder(_config({"class": "GraphConstruction"}))


def test_the_unsupervised_nesting_is_one_multiview_contrast_task():
    cfg = _config({"class": "MultiviewContrast", "model": _fusion(), "crop_funcs": [{"class": "SubsequenceNode"}],
                   "noise_funcs": [{"class": "IdentityNode"}]}, task="Unsupervised")
    del cfg.task["num_mlp_layer"]
    task = build_task(cfg)
    assert isinstance(task, MultiviewContrast) and isinstance(task.encoder, FusionNetwork)
    assert {k.split(".")[0] for k in task.state_dict()} == {"encoder", "mlp"}
    cfg.task.num_mlp_layer = 2
    with pytest.raises(ConfigError, match="Unsupervised takes model and graph_construction_model only"):
        build_task(cfg)


def _ids(parameters):
    return {id(p) for p in parameters}


def test_ratios_freeze_and_group_the_encoder_parameters():
    cfg = _config(_fusion("cross", cross_dim=16), sequence_model_lr_ratio=0.1)
    task = build_task(cfg, [0, 1])
    groups = task.encoder.parameter_groups()
    assert set(groups) == {"sequence_model", "structure_model", "fusion"}
    optimizer = optimizer_groups(cfg, task, 1e-3)
    lrs = {frozenset(_ids(g["params"])): g["lr"] for g in optimizer}
    sequence = frozenset(_ids(p for p in groups["sequence_model"] if p.requires_grad))
    assert lrs[sequence] == pytest.approx(1e-4)
    # DEVIATION: cross fusion's own layers train (the original left them at their initialisation)
    assert lrs[frozenset(_ids(groups["fusion"]))] == 1e-3
    assert sum(len(g["params"]) for g in optimizer) == sum(p.requires_grad for p in task.parameters())

    original_cfg = _config(_fusion("cross", cross_dim=16), sequence_model_lr_ratio=0.1,
                           original_optimizer_groups=True)
    original = build_task(original_cfg, [0, 1])
    fusion = original.encoder.parameter_groups()["fusion"]
    assert not any(p.requires_grad for p in fusion)
    assert not _ids(fusion) & _ids(p for g in optimizer_groups(original_cfg, original, 1e-3) for p in g["params"])

    frozen = build_task(_config(_fusion(), fix_sequence_model=True), [0, 1])
    esm = frozen.encoder.sequence_model
    assert isinstance(esm, ESM) and "sequence_model" in esm.frozen
    assert not any(p.requires_grad for p in esm.parameters())
    assert learning_rate_ratios(_config(_fusion(), lr_ratio=0.5, sequence_model_lr_ratio=0.1),
                                frozen.encoder) == {"sequence_model": 0.5, "structure_model": 0.5}  # lr_ratio wins
    with pytest.raises(ConfigError, match="need an encoder with a sequence model"):
        build_task(_config(GEARNET, sequence_model_lr_ratio=0.1), [0, 1])


def test_a_frozen_sequence_model_gets_no_gradient_and_no_optimizer_state():
    cfg = _config(_fusion(), sequence_model_lr_ratio=0.0)
    task = build_task(cfg, [0, 1, 2])
    optimizer = torch.optim.Adam(optimizer_groups(cfg, task, 1e-3), lr=1e-3)
    from esm_gearnet.data import ProteinBatch
    from esm_gearnet.data.synthetic import backbone_protein

    proteins = [backbone_protein("MKVLIVGAGPSGLAEALRLA", "LEEEELLLLHHHHHHHHHHL"),
                backbone_protein("GKTWTVEVNGKKYTVEVSG", "LEEEEEELLLLEEEEEELL")]
    batch = {"graph": ProteinBatch.pack(proteins), "targets": torch.tensor([[1, 0, 1], [0, 1, 0]])}
    loss, _ = task(batch)
    loss.backward()
    optimizer.step()
    sequence = task.encoder.parameter_groups()["sequence_model"]
    assert all(p.grad is None for p in sequence)
    assert not _ids(sequence) & _ids(optimizer.state)
    assert all(p.grad is not None for p in task.encoder.parameter_groups()["structure_model"])
