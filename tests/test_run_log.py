"""Engine.record: the history, metrics.jsonl, curves.png and TensorBoard, which is opened only at the first
per-epoch record (a run that trains nothing leaves no events file)."""
import json

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


def test_tensorboard_opens_at_the_first_epoch_record_and_holds_every_scalar_at_its_epoch(tmp_path):
    """The events file read back: each "<split>/<metric>" once per epoch, at step = epoch (not the record's
    optimizer step), with its value (binary fractions, exact in TensorBoard's float32)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    engine = _engine(tmp_path)
    engine.record({"final": {"best_epoch": None, "valid": {}, "test": {}}})  # as Engine.final writes it
    assert _events(tmp_path) == []
    engine.record({"epoch": 1, "step": 3, "train": {"loss": 0.5}, "valid": {"f1_max": 0.25}, "test": {"f1_max": 0.125}})
    engine.record({"epoch": 2, "step": 6, "train": {"loss": 0.375}, "valid": {"f1_max": 0.75, "auprc@micro": 0.625},
                   "test": {"f1_max": 0.5}})
    assert len(_events(tmp_path)) == 1  # one writer for the run
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert scalars == {"train/loss": [(1, 0.5), (2, 0.375)], "valid/f1_max": [(1, 0.25), (2, 0.75)],
                       "valid/auprc@micro": [(2, 0.625)], "test/f1_max": [(1, 0.125), (2, 0.5)]}
    engine.close()
