"""Streamed training data (`engine.stream`) and pre-training from a FoldComp database: the epoch's order is one
for every world size, every entry is seen once an epoch, and a run killed with kill -9 resumes exactly (same
world size) or at its sample (another world size)."""
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ALPHAFOLD, _require, run_command, run_dir_of
from esm_gearnet.data.datasets import FoldCompDB
from esm_gearnet.data.io.foldcomp import write_database
from esm_gearnet.engine.stream import Batches, Items, Order, Permutation, collate_stream, loader

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "config" / "demo" / "pretrain_foldcomp.yaml"


def _records(copies: int):
    import foldcomp

    files = sorted(_require(ALPHAFOLD).glob("*.pdb"))
    records = [foldcomp.compress(f.name, f.read_text()) for f in files]
    return [(f"{f.stem}_{k}", record) for k in range(copies) for f, record in zip(files, records)]


@pytest.fixture(scope="module")
def database(tmp_path_factory):
    """30 entries: the 3 AlphaFold models of ../shared/data, 10 times under other names."""
    return write_database(tmp_path_factory.mktemp("db") / "db", _records(10))


class Lengths:
    """A stand-in streamed dataset: n entries whose lengths are given (no structures)."""
    streamed = True

    def __init__(self, lengths):
        self._lengths = np.asarray(lengths)

    def __len__(self):
        return len(self._lengths)

    def lengths(self, indices):
        return self._lengths[indices]


# ---- the order ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4099])
def test_permutation_is_a_bijection_and_depends_on_the_seed(n):
    images = [Permutation(n, seed)(np.arange(n)) for seed in range(3)]
    for image in images:
        assert sorted(image.tolist()) == list(range(n))
    if n >= 7:
        assert not np.array_equal(images[0], images[1])
    np.testing.assert_array_equal(Permutation(n, 5)(np.arange(n)), Permutation(n, 5)(np.arange(n)))


def test_windows_are_sorted_by_length_and_the_epochs_differ():
    data = Lengths(np.random.default_rng(0).integers(50, 500, 100))
    order = Order(data, seed=1, epoch=0, window=16)
    sequence = order[0:100]
    assert sorted(sequence.tolist()) == list(range(100))
    for w in range(6):
        lengths = data.lengths(sequence[w * 16:(w + 1) * 16])
        assert (np.diff(lengths) >= 0).all() or (np.diff(lengths) <= 0).all()
    np.testing.assert_array_equal(order[37:61], sequence[37:61])  # any slice of the one sequence
    assert not np.array_equal(Order(data, seed=1, epoch=1, window=16)[0:100], sequence)


def _global_sequence(data, batch_size, world_size, start=0, stop=None):
    """The samples every rank trains on, in global order (rank order inside a global batch), fillers left out."""
    ranks = [list(Batches(data, batch_size, r, world_size, seed=3, epoch=2, start=start, stop=stop, window=8))
             for r in range(world_size)]
    assert len({len(batches) for batches in ranks}) == 1  # every rank steps alike
    sequence = []
    for step in zip(*ranks):
        assert len({(request.start, request.end) for request in step}) == 1
        for request in step:
            sequence.extend(index for index, _ in request)
    return sequence


def test_the_sequence_does_not_depend_on_the_world_size_or_batch_size():
    data = Lengths(np.random.default_rng(1).integers(50, 500, 53))
    reference = _global_sequence(data, 1, 1)
    assert sorted(reference) == list(range(53))
    for batch_size, world_size in [(3, 1), (2, 2), (4, 3), (5, 4)]:
        assert _global_sequence(data, batch_size, world_size) == reference


def test_resuming_at_a_sample_with_another_world_size_sees_every_entry_once():
    data = Lengths(np.random.default_rng(2).integers(50, 500, 41))
    first = _global_sequence(data, 2, 2, stop=16)  # killed after 4 steps of 2 x 2
    rest = _global_sequence(data, 3, 3, start=16)  # continued by 3 ranks
    assert sorted(first + rest) == list(range(41))
    assert first + rest == _global_sequence(data, 1, 1)


def test_a_rank_without_samples_in_the_last_batch_gets_a_filler():
    data = Lengths([100] * 8)  # 3 ranks x batch 2: a global batch of 6, then one of 2
    (first0, last0), (_, last1), (_, last2) = [list(Batches(data, 2, r, 3, seed=0, epoch=0)) for r in range(3)]
    assert len(first0) == 2 and [len(last0), len(last1), len(last2)] == [0, 1, 1]
    others = {i for i, _ in last1 + last2}
    assert {index for index, _ in last0.fillers[:2]} == others  # first the batch's entries of other ranks
    assert len(last0.fillers) > 2 and not {index for index, _ in last0.fillers[2:]} & others  # then its neighbours


# ---- FoldCompDB streamed --------------------------------------------------------------------------------------
def test_the_stream_decodes_every_training_entry_once_and_holds_the_held_out_sample_apart(database):
    dataset = FoldCompDB(database, held_out=4)
    train, valid, test = dataset.split()
    assert (len(train), len(valid), len(test)) == (26, 4, 0)
    names = []
    for rank in range(2):
        for batch in loader(train, 3, rank, 2, seed=0, epoch=0):
            assert batch["stream"]["weight"] == 1.0 and batch["stream"]["skipped"] == []
            names.extend(batch["graph"].names)
            assert batch["stream"]["count"] == batch["graph"].batch_size
    held_out = {valid[i]["graph"].name for i in range(len(valid))}
    trained = [train.name(i) for i in range(len(train))]
    assert sorted(names) == sorted(trained) and len(set(trained)) == 26 and not held_out & set(trained)
    assert held_out | set(trained) == {dataset.name(i) for i in range(len(dataset))}


def test_crops_are_seeded_by_the_sample_not_by_the_worker_or_rank(database):
    class Crop:  # a random window, as the datasets' crop transforms draw it (torch's generator)
        def __call__(self, item):
            graph = item["graph"]
            start = int(torch.randint(graph.num_residue - 10, ()))
            return {"graph": graph.subresidue(torch.arange(start, start + 10))}

    dataset = FoldCompDB(database, transform=Crop())

    def crops(num_workers, world_size):
        out = {}
        for rank in range(world_size):
            for batch in loader(dataset, 4, rank, world_size, seed=7, epoch=1, num_workers=num_workers):
                for i, protein in enumerate(batch["graph"].unpack()):
                    out[(batch["stream"]["start"], i, rank)] = protein.pos
        return sorted(tuple(map(float, pos[0])) for pos in out.values())

    assert crops(0, 1) == crops(1, 2)


def test_an_entry_that_does_not_decode_is_named_skipped_and_the_slice_falls_back_to_a_filler(tmp_path):
    records = _records(1)
    broken = [(name, record[:40]) if k in (1, 2) else (name, record) for k, (name, record) in enumerate(records)]
    database = write_database(tmp_path / "db", broken)
    dataset = FoldCompDB(database)
    items = Items(dataset)
    from esm_gearnet.engine.stream import Request

    data = items.__getitems__(Request([(1, 0), (2, 0)], [(0, 0)], 0, 3))
    assert data["weight"] == 0.0 and len(data["items"]) == 1 and len(data["skipped"]) == 2
    name, reason = data["skipped"][0]
    assert name == records[1][0] and str(database) in reason and "does not decode" in reason
    batch = collate_stream(data)
    assert batch["stream"]["count"] == 0 and batch["stream"]["weight"] == 0.0


# ---- pre-training from a database: kill -9, resume with 1, 2 and 3 ranks ---------------------------------------
# `python -c RECORD_AND_KILL RECORD N script.py ARGS...`: script.py run as usual, except that every rank appends
# the names of the entries it trains on to RECORD.RANK (with the global batch's start), and kills itself with
# SIGKILL right after the Nth last.pth is written (0: never). Nothing in esm_gearnet knows about it.
RECORD_AND_KILL = """
import os, runpy, signal, sys
from esm_gearnet.engine import Engine, stream

record, kill_at, sys.argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
collate = stream.collate_stream

def named(data):
    batch = collate(data)
    batch["stream"]["names"] = [item["graph"].name for item in data["items"]]
    return batch

stream.collate_stream = named
streamed = Engine._streamed_batch

def recorded(self, dataset, place):
    if place["weight"]:
        with open(f"{record}.{self.rank}", "a") as handle:
            handle.writelines(f"{place['start']}\\t{name}\\n" for name in place["names"])
    streamed(self, dataset, place)

Engine._streamed_batch = recorded
save, saves = Engine.save, []

def save_then_die(self, name, position=None):
    save(self, name, position)
    if name == "last.pth":
        saves.append(name)
        if len(saves) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

Engine.save = save_then_die
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _pretrain(database, out, record, kill_at=0, ranks=2, resume=None):
    script = ["script/pretrain.py"] + (["--resume", str(resume)] if resume else
                                       ["-c", str(DEMO), "--database", str(database), "--num_protein", "30",
                                        "--held_out", "4", "--engine.batch_size", "2", "--num_epoch", "1",
                                        "--save_interval", "2", "--output_dir", str(out)])
    wrapped = ["-c", RECORD_AND_KILL, str(record), str(kill_at), *script]
    command = ([sys.executable, *wrapped] if ranks == 1 else
               [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                "--no-python", sys.executable, *wrapped])
    return run_command(command, timeout=300, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _seen(record: Path):
    """{start of the global batch: [names]} over the record files of every rank."""
    lines = [line.split("\t") for path in record.parent.glob(record.name + ".*") for line in
             path.read_text().splitlines()]
    return sorted((int(start), name) for start, name in lines)


def _weights(path):
    from esm_gearnet import checkpoint

    return checkpoint.task_state(checkpoint.load(path))


@pytest.mark.slow
def test_pretraining_from_a_database_resumes_after_kill_9_with_any_number_of_ranks(tmp_path):
    """The demo's database of 30 proteins (4 held out), 2 ranks x batch 2, a checkpoint every 2 steps: killed
    after the second, resumed with 2 ranks (the uninterrupted run's weights), 1 and 3 ranks (every entry once)."""
    database = tmp_path / "demo" / "demo_folds"
    whole = _pretrain(database, tmp_path / "whole", tmp_path / "whole.tsv")
    assert whole.returncode == 0, whole.stderr[-3000:]
    whole_dir = run_dir_of(tmp_path / "whole")
    killed = _pretrain(database, tmp_path / "killed", tmp_path / "killed.tsv", kill_at=2)
    assert killed.returncode != 0
    killed_dir = run_dir_of(tmp_path / "killed")
    state = torch.load(killed_dir / "last.pth", map_location="cpu", weights_only=False)
    at = state["training"]["within"][0]["sample"]
    assert at == 16  # 2 saves x 2 steps x (2 ranks x batch 2)
    before = [(start, name) for start, name in _seen(tmp_path / "killed.tsv") if start < at]
    train_names = {name for _, name in _seen(tmp_path / "whole.tsv")}
    assert len(train_names) == 26

    for ranks in (2, 1, 3):
        run = tmp_path / f"resumed{ranks}"
        shutil.copytree(killed_dir, run)
        resumed = _pretrain(database, None, tmp_path / f"resumed{ranks}.tsv", ranks=ranks, resume=run)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        after = _seen(tmp_path / f"resumed{ranks}.tsv")
        assert min(start for start, _ in after) == at
        names = [name for _, name in before] + [name for _, name in after]
        assert sorted(names) == sorted(train_names), ranks  # every entry of the epoch once: none lost, none twice
        if ranks == 2:  # the same world size: the weights of the uninterrupted run
            a, b = _weights(whole_dir / "model_epoch_1.pth"), _weights(run / "model_epoch_1.pth")
            for key in a:
                torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=key)
            assert _seen(tmp_path / "whole.tsv") == sorted(before + after)
        else:
            assert (run / "model_epoch_1.pth").is_file()


# ---- a worker that dies ---------------------------------------------------------------------------------------
class Killer:
    """A streamed dataset of n small proteins, whose entries `bad` kill any process that reads them but the test's
    own (`parent`, which a killed read would end), and whose entry `broken` raises a plain error."""
    streamed = True
    path = "killer"

    def __init__(self, n, bad, parent, broken=None):
        self.n, self.bad, self.parent, self.broken = n, bad, parent, broken

    def __len__(self):
        return self.n

    def lengths(self, indices):
        return np.full(len(indices), 10)

    def name(self, index):
        return f"item{index}"

    def item(self, index, seed=None):
        from esm_gearnet.data.protein import Protein

        if index in self.bad:
            assert os.getpid() != self.parent, "the entry was read in the training process"
            os.kill(os.getpid(), 9)
        if index == self.broken:
            raise KeyError("a bug in a transform")
        return {"graph": Protein.from_sequence("ACDEFGHIKL", torch.randn(10, 3), name=self.name(index))}


@pytest.mark.parametrize("batch_size", [1, 3])
def test_a_dead_worker_costs_nothing_and_an_entry_that_kills_twice_is_skipped_and_named(batch_size):
    """The loader starts again after the last batch it delivered; a batch whose worker died twice is read entry by
    entry, each in a process of its own (never in the training process): its good entries come back, the killer
    is named."""
    dataset = Killer(20, bad={7}, parent=os.getpid())
    seen, skipped = [], []
    for batch in loader(dataset, batch_size, 0, 1, seed=0, epoch=0, num_workers=1):
        seen.extend(batch["graph"].names if batch["stream"]["weight"] else [])
        skipped.extend(batch["stream"]["skipped"])
    assert sorted(seen) == sorted(f"item{i}" for i in range(20) if i != 7)  # nothing lost, nothing twice
    assert [name for name, _ in skipped] == ["item7"] and "killed the process reading it (SIGKILL)" in skipped[0][1]


def test_an_error_inside_a_worker_is_raised_not_taken_for_a_death():
    with pytest.raises(KeyError, match="a bug in a transform"):
        for _ in loader(Killer(6, bad=set(), parent=os.getpid(), broken=4), 2, 0, 1, seed=0, epoch=0,
                        num_workers=1):
            pass
