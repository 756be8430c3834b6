"""Tasks on real structures: heads, losses, normalisation, MSP's mutated-position pooling, evaluation names."""
import pytest
import torch
import torch.nn.functional as F

from esm_gearnet.data import ProteinBatch
from esm_gearnet.data.graph import AlphaCarbonNode, GraphConstruction, SequentialEdge
from esm_gearnet.models import GearNet
from esm_gearnet.tasks import MSP, MultipleBinaryClassification, PropertyPrediction


def _gearnet():
    torch.manual_seed(0)
    graph = GraphConstruction([AlphaCarbonNode()], [SequentialEdge(max_distance=1)])
    return GearNet(21, [16, 16], num_relation=3, readout="sum", graph_construction_model=graph)


class _Items(torch.utils.data.Dataset):
    def __init__(self, targets):
        self.targets = targets

    def __len__(self):
        return len(self.targets)


def test_multiple_binary_classification(all_proteins):
    task = MultipleBinaryClassification(_gearnet(), task=[0, 1, 2], num_mlp_layer=2).eval()
    batch = {"graph": ProteinBatch.pack(all_proteins[:3]), "targets": torch.tensor([[1, 0, 0], [0, 1, 1], [0, 0, 1]])}
    pred = task.predict(batch)
    assert pred.shape == (3, 3) and len(task.mlp.layers) == 2
    loss, info = task(batch)
    torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(pred, batch["targets"].float()))
    assert set(task.evaluate(pred, batch["targets"])) == {"auprc@micro", "f1_max"}
    with pytest.raises(ValueError, match="needs its task list"):
        MultipleBinaryClassification(_gearnet(), task=[])


def test_property_prediction_normalises_with_the_training_split(all_proteins):
    task = PropertyPrediction(_gearnet(), task=["gdt_ts"], metric=["mae", "spearmanr"]).eval()
    train_targets = torch.tensor([[0.2], [0.4], [float("nan")], [0.9]])
    task.preprocess(_Items(train_targets))
    values = torch.tensor([0.2, 0.4, 0.9], dtype=torch.float64)
    assert task.mean.item() == pytest.approx(values.mean().item(), abs=1e-6)
    assert task.std.item() == pytest.approx(values.std().item(), abs=1e-6)  # unlabeled entries ignored
    batch = {"graph": ProteinBatch.pack(all_proteins[:3]), "targets": torch.tensor([[0.3], [float("nan")], [0.8]])}
    pred = task.predict(batch)
    raw = task.mlp(task.encoder(batch["graph"])["graph_feature"])
    torch.testing.assert_close(pred, raw * task.std + task.mean)  # reported in the original scale
    loss, _ = task(batch)
    expected = (((raw - (batch["targets"] - task.mean) / task.std) ** 2)[[0, 2]]).mean()
    torch.testing.assert_close(loss, expected)
    metrics = task.evaluate(torch.tensor([[0.1], [0.5], [0.2], [0.9]]), torch.tensor([[0.0], [1.0], [0.5], [0.7]]),
                            {"target_id": ["a", "a", "b", "b"]})
    assert set(metrics) == {"mae [gdt_ts]", "spearmanr [gdt_ts]", "per_target_spearmanr [gdt_ts]"}
    assert metrics["per_target_spearmanr [gdt_ts]"] == pytest.approx(1.0)


def test_msp_pools_the_mutated_positions(all_proteins):
    wild = all_proteins[0].subresidue(torch.arange(30))
    types = wild.residue_type.clone()
    types[[4, 17]] = (types[[4, 17]] + 1) % 20
    mutant = wild.replace(residue_type=types)
    task = MSP(_gearnet(), task=["label"], num_mlp_layer=2).eval()
    batch = {"graph1": ProteinBatch.pack([wild, wild]), "graph2": ProteinBatch.pack([mutant, wild]),
             "targets": torch.tensor([1, 0])}
    pred = task.predict(batch)
    assert pred.shape == (2, 1)
    features = task.encoder(ProteinBatch.pack([wild]))["residue_feature"]
    mutant_features = task.encoder(ProteinBatch.pack([mutant]))["residue_feature"]
    pooled = torch.cat([features[[4, 17]].mean(0), mutant_features[[4, 17]].mean(0)])
    torch.testing.assert_close(pred[0], task.mlp(pooled), atol=1e-5, rtol=1e-5)
    # no mutation: both sides pool nothing (zero vectors), as the original
    torch.testing.assert_close(pred[1], task.mlp(torch.zeros_like(pooled)), atol=1e-5, rtol=1e-5)
    assert set(task.evaluate(pred, batch["targets"].float().view(-1, 1))) == {"auroc [label]", "auprc [label]"}


def test_scores_stay_fp32_under_bf16_autocast(all_proteins):
    """The encoder may run in bf16; the head's scores do not: bf16 logits keep about three significant digits,
    and the ties they make lower tie-aware f1_max / auprc@micro (autocast on the CPU stands in for CUDA)."""
    task = MultipleBinaryClassification(_gearnet(), task=list(range(64)), num_mlp_layer=2).eval()
    torch.nn.init.normal_(task.mlp.layers[-1].weight, std=3.0)
    batch = {"graph": ProteinBatch.pack(all_proteins[:8])}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        pred = task.predict(batch)
        feature = task.encoder(batch["graph"])["graph_feature"]
        bf16 = task.mlp(feature)  # the head under autocast, as before
    assert pred.dtype == torch.float32 and bf16.dtype == torch.bfloat16
    torch.testing.assert_close(pred, task.mlp(feature.float()))
    assert len(torch.unique(pred)) > len(torch.unique(bf16.float()))  # fewer ties
