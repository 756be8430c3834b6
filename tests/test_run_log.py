"""Engine.record: the history, metrics.jsonl, curves.png and TensorBoard, which is opened only at the first
per-epoch record (a run that trains nothing leaves no events file)."""
import json

import pytest
import torch

from esm_gearnet.engine import Engine

EPOCH = {"epoch": 1, "step": 3, "train": {"loss": 0.5}, "valid": {"f1_max": 0.25}, "test": {"f1_max": 0.2}}


def _engine(run_dir):
    task = torch.nn.Linear(2, 1)
    return Engine(task, [], None, None, torch.optim.SGD(task.parameters(), lr=0.1), run_dir=run_dir, progress=False)


def _events(run_dir):
    return sorted(p.name for p in run_dir.iterdir() if p.name.startswith("events.out.tfevents"))


def test_record_appends_history_metrics_and_curves(tmp_path):
    engine = _engine(tmp_path)
    assert list(tmp_path.iterdir()) == []  # building an engine writes nothing
    engine.record({"note": "no epoch"})
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # curves only for per-epoch records
    engine.record(EPOCH)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == engine.history == [{"note": "no epoch"}, EPOCH]
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_record_without_run_dir_keeps_the_history_only(tmp_path):
    engine = _engine(None)
    engine.record(EPOCH)
    assert engine.history == [EPOCH]


def test_tensorboard_opens_at_the_first_epoch_record(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is optional and not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    engine = _engine(tmp_path)
    engine.record({"final": {"test": {}}})
    assert _events(tmp_path) == []
    engine.record(EPOCH)
    engine.record({**EPOCH, "epoch": 2, "train": {"loss": 0.4}})
    assert len(_events(tmp_path)) == 1  # one writer for the run
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["test/f1_max", "train/loss", "valid/f1_max"]
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars("train/loss")] == [(1, 0.5), (2, 0.4)]
