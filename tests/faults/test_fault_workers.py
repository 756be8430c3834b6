"""Worker processes that die (the OOM killer, a crash in C code) and ATOM3D LMDBs that cannot be read: the run
ends within seconds with a sentence naming the job, or the job is retried alone, reported and skipped; never a
hang, and the other jobs' results all come back in order."""
import faulthandler
import gzip
import importlib.util
import json
import logging
import os
import signal
import time
from pathlib import Path

import lmdb
import pytest

from esm_gearnet.data import io as structure_io
from esm_gearnet.data.datasets import PSRDataset, write_lmdb
from esm_gearnet.data.datasets import atom3d
from esm_gearnet.data.datasets.atom3d import LMDBError, LMDBFile
from esm_gearnet.data.parallel import WorkerDied, ordered_map

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
DEATHS = {  # what a job does to its worker: (how ordered_map names it)
    "kill": (lambda: os.kill(os.getpid(), signal.SIGKILL), "SIGKILL"),
    "segfault": (lambda: (faulthandler.disable(), os.kill(os.getpid(), signal.SIGSEGV)), "SIGSEGV"),  # quietly
    "exit": (lambda: os._exit(3), "exit code 3"),
}


def _dies_on(job):
    """job = (number, death, marker): dies as `death` says for number 13 (once only when `marker` is a path
    that does not exist yet: it is created first), else returns number * 2."""
    number, death, marker = job
    if number == 13 and death and (marker is None or not os.path.exists(marker)):
        if marker is not None:
            open(marker, "w").close()
        DEATHS[death][0]()
    return number * 2


def _died(job, how):
    return f"died ({how}) on {job[0]}"


@pytest.mark.parametrize("death", DEATHS)
@pytest.mark.parametrize("workers", [2, 3])
def test_job_killing_its_worker_is_reported_and_the_rest_come_in_order(death, workers):
    jobs = [(n, death, None) for n in range(100)]
    start = time.monotonic()
    results = list(ordered_map(_dies_on, jobs, workers=workers, progress=False, on_death=_died))
    assert time.monotonic() - start < 60
    assert results == [f"died ({DEATHS[death][1]}) on 13" if n == 13 else 2 * n for n in range(100)]


def test_without_on_death_the_map_ends_with_a_sentence_naming_the_job():
    with pytest.raises(WorkerDied, match=r"^a worker process died \(SIGKILL\) while working on \(13, 'kill', None\), "
                                         r"run again alone in a fresh process after a first worker died with it in progress; find what kills it"):
        list(ordered_map(_dies_on, [(n, "kill", None) for n in range(40)], workers=2, progress=False))


def _raises_after_a_death(job):
    number, marker = job
    if number == 13 and not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    if number == 13:
        raise ValueError("job 13 raised")
    return number


def test_exception_of_a_job_run_again_alone_is_raised_as_in_the_pool(tmp_path):
    with pytest.raises(ValueError, match="job 13 raised"):
        list(ordered_map(_raises_after_a_death, [(n, str(tmp_path / "m")) for n in range(40)], workers=2,
                         progress=False))


def test_worker_killed_once_is_retried_alone_and_reported(tmp_path, caplog):
    """A worker killed once (memory pressure elsewhere, say): its jobs are run again and nothing is lost."""
    jobs = [(n, "kill", str(tmp_path / "killed_once")) for n in range(100)]
    with caplog.at_level(logging.WARNING, logger="esm_gearnet"):
        results = list(ordered_map(_dies_on, jobs, workers=2, progress=False))
    assert results == [2 * n for n in range(100)]
    assert "a worker process died; the" in caplog.text and "run again one at a time" in caplog.text


def _kill_parse(job):
    if Path(job[0]).name == "1GN0-A.pdb":
        os.kill(os.getpid(), signal.SIGKILL)
    return _PARSE(job)


_PARSE = structure_io._parse_for_pool


def test_load_structures_with_a_worker_killed_mid_parse_skips_that_file(monkeypatch):
    """The file whose reading kills its worker (the OOM killer, say) is skipped with a sentence; the others load."""
    files = sorted((SHARED / "structures").glob("*.pdb"))
    if not files:
        pytest.skip("../shared/data is absent")
    assert any(f.name == "1GN0-A.pdb" for f in files)
    monkeypatch.setattr(structure_io, "_parse_for_pool", _kill_parse)
    start = time.monotonic()
    proteins, skipped = structure_io.load_structures(files, workers=2, progress=False)
    assert time.monotonic() - start < 60
    assert [(Path(path).name, reason.split(": ", 1)[1]) for path, reason in skipped] == [
        ("1GN0-A.pdb", "the process reading it died (SIGKILL), also when run again alone.")]
    assert [p.name for p in proteins] == [f.name[:-4] for f in files if f.name != "1GN0-A.pdb"]


# ---- ATOM3D ------------------------------------------------------------------------------------------------
_PARSE_ITEM = atom3d._parse_item


def _kill_item(job):
    if job[0].endswith("train") and job[1] == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return _PARSE_ITEM(job)


def _write_psr(root):
    """The PSR LMDBs of tests/conftest.py (written from the real structures); loaded by path: this folder's
    conftest.py takes the module name."""
    if not (SHARED / "structures").exists():
        pytest.skip("../shared/data is absent")
    spec = importlib.util.spec_from_file_location("tests_conftest", Path(__file__).parents[1] / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.write_psr(root)
    return root / "PSR-split-by-year" / "split-by-year" / "data"


def test_atom3d_item_killing_its_worker_is_skipped_with_its_reason(tmp_path, monkeypatch):
    data = _write_psr(tmp_path)
    monkeypatch.setattr(atom3d, "_parse_item", _kill_item)
    dataset = PSRDataset(tmp_path, workers=2, progress=False)
    assert dataset.num_samples == [3, 2, 2]  # train: 5 items, the broken one and the killer skipped
    assert (str(data / "train"), f"{data / 'train'}[1]: the process reading this item died (SIGKILL), also when "
                                 "retried alone.") in dataset.skipped


def test_atom3d_lmdb_none_of_whose_items_reads_is_an_error(tmp_path):
    data = _write_psr(tmp_path)
    frame = {"columns": ["model"], "index": [0], "data": [[1]]}
    for split in ("val",):
        (data / split / "data.mdb").unlink()
        write_lmdb(data / split, [{"id": f"x{i}", "atoms": frame, "scores": {}} for i in range(3)])
    with pytest.raises(LMDBError, match=rf"^{data / 'val'}: none of its 3 items could be read \(first: "
                                        rf"{data / 'val'}\[0\]: x0: the atom table lacks the column"):
        PSRDataset(tmp_path, workers=0, progress=False)


def _damage(path, key, value):
    env = lmdb.open(str(path))
    with env.begin(write=True) as txn:
        if value is None:
            txn.delete(key)
        else:
            txn.put(key, value)
    env.close()


LMDB_DAMAGE = {  # key: (new value or None to delete it, the item read (None: the header), what the sentence says)
    "count_not_a_number": (b"num_examples", b"four", None, r"num_examples is b'four', not a whole number"),
    "count_missing": (b"num_examples", None, None, r"not an ATOM3D LMDB \(no num_examples key\)"),
    "ids_not_json": (b"id_to_idx", b"{not json", None, r"the header .* cannot be read \(JSONDecodeError"),
    "ids_out_of_range": (b"id_to_idx", b'{"a": 7}', None, r"the header .* cannot be read \(IndexError"),
    "item_missing": (b"1", None, 1, r"item 1 is missing"),
    "item_not_gzip": (b"0", b"plain bytes", 0, r"item 0 cannot be read \(error: Error -3 while decompressing data: incorrect header check\)"),
    "item_truncated": (b"0", gzip.compress(b'{"id": "a", "atoms": ' * 50)[:40], 0, r"item 0 is truncated \(its gzip stream ends early\)"),
    "item_not_json": (b"0", gzip.compress(b"{oops"), 0, r"item 0 cannot be read \(JSONDecodeError"),
    "item_a_list": (b"0", gzip.compress(json.dumps([1, 2]).encode()), 0, r"item 0 is a list, not a dict"),
}


@pytest.mark.parametrize("case", LMDB_DAMAGE)
def test_lmdb_errors_name_the_lmdb(tmp_path, case):
    key, value, index, said = LMDB_DAMAGE[case]
    path = tmp_path / "lmdb"
    write_lmdb(path, [{"id": "a", "label": "1"}, {"id": "b", "label": "0"}])
    _damage(path, key, value)
    with pytest.raises(LMDBError, match=rf"^{path}: {said}"):
        LMDBFile(path)[0] if index is None else LMDBFile(path)[index]


def test_lmdb_file_that_is_not_an_lmdb_is_named(tmp_path):
    (tmp_path / "data.mdb").write_bytes(b"\0" * 8192)
    with pytest.raises(LMDBError, match=rf"^{tmp_path}: the header .* cannot be read \(\w*Error: "):
        LMDBFile(tmp_path)
