"""Metrics against scikit-learn / scipy and a slow Fmax reference, on random data with ties."""
import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.metrics import average_precision_score, roc_auc_score

from esm_gearnet import metrics


def _data(seed, n=300, ties=True):
    generator = torch.Generator().manual_seed(seed)
    pred = torch.rand(n, generator=generator)
    if ties:
        pred = (pred * 7).round() / 7  # a handful of distinct values: many ties
    target = (torch.rand(n, generator=generator) < 0.3 + 0.4 * pred).long()
    return pred, target


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ties", [True, False])
def test_auprc_and_auroc_equal_sklearn(seed, ties):
    pred, target = _data(seed, ties=ties)
    assert metrics.auprc(pred, target).item() == pytest.approx(average_precision_score(target, pred), abs=1e-12)
    assert metrics.auroc(pred, target).item() == pytest.approx(roc_auc_score(target, pred), abs=1e-12)


def test_auprc_micro_pools_every_pair():
    generator = torch.Generator().manual_seed(0)
    pred = (torch.rand(20, 9, generator=generator) * 5).round()
    target = (torch.rand(20, 9, generator=generator) < 0.3).long()
    expected = average_precision_score(target.flatten(), pred.flatten())
    assert metrics.auprc_micro(pred, target).item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ties", [True, False])
def test_correlations_and_errors_equal_scipy(seed, ties):
    pred, _ = _data(seed, ties=ties)
    target, _ = _data(seed + 100, ties=ties)
    pred, target = pred.double(), target.double() + 0.5 * pred.double()
    assert metrics.spearmanr(pred, target).item() == pytest.approx(stats.spearmanr(pred, target)[0], abs=1e-12)
    assert metrics.pearsonr(pred, target).item() == pytest.approx(stats.pearsonr(pred, target)[0], abs=1e-10)
    diff = (pred - target).double().numpy()
    assert metrics.mae(pred, target).item() == pytest.approx(np.abs(diff).mean(), abs=1e-12)
    assert metrics.rmse(pred, target).item() == pytest.approx(np.sqrt((diff ** 2).mean()), abs=1e-12)


def _slow_f1_max(pred, target):
    best = 0.0
    for threshold in sorted(set(pred.flatten().tolist())):
        precisions, recalls = [], []
        for p, t in zip(pred.tolist(), target.tolist()):
            chosen = [i for i, v in enumerate(p) if v >= threshold]
            hits = sum(t[i] for i in chosen)
            if chosen:
                precisions.append(hits / len(chosen))
            recalls.append(hits / sum(t) if sum(t) else 0.0)
        precision = sum(precisions) / len(precisions)
        recall = sum(recalls) / len(recalls)
        if precision + recall > 0:
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


@pytest.mark.parametrize("seed", range(5))
def test_f1_max_equals_slow_reference(seed, device):
    generator = torch.Generator().manual_seed(seed)
    pred = (torch.rand(12, 7, generator=generator) * (3 + seed)).round() / (3 + seed)  # ties within and across rows
    target = (torch.rand(12, 7, generator=generator) < 0.35).long()
    target[0] = 0  # a protein without annotations counts in recall's denominator
    fast = metrics.f1_max(pred.to(device), target.to(device)).item()
    assert fast == pytest.approx(_slow_f1_max(pred, target), abs=1e-9 if device.type == "cpu" else 1e-6)


def test_per_target_spearman_and_accuracy():
    pred = torch.tensor([0.1, 0.4, 0.3, 0.9, 0.2, 0.5, 0.7])
    target = torch.tensor([1.0, 2.0, 3.0, 1.0, 0.0, 2.0, 5.0])
    group = ["a", "a", "a", "b", "b", "b", "c"]  # "c" has one decoy: no correlation
    expected = (stats.spearmanr([0.1, 0.4, 0.3], [1, 2, 3])[0] + stats.spearmanr([0.9, 0.2, 0.5], [1, 0, 2])[0]) / 2
    assert metrics.per_target_spearmanr(pred, target, group).item() == pytest.approx(expected, abs=1e-12)
    assert metrics.accuracy(torch.tensor([[0.1, 0.9], [2.0, 1.0]]), torch.tensor([1, 1])).item() == 0.5
    assert metrics.accuracy(torch.tensor([0.3, -1.0, 2.0]), torch.tensor([1, 0, 0])).item() == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="unknown metric 'f1'"):
        metrics.get_metric("f1")
