"""Outputs never tear and fail before the work, not after: a full disk or a read-only location ends in one sentence
naming the path (exit code 2) with the files that were there intact; a second writer of an output is refused; a
second build of a dataset cache waits for the first; outputs honour the umask.

Faults are real where this machine permits (a read-only bind mount, a full tmpfs: as root here and in CI) and are
injected at the one atomic writer (`writing._sync`, where every whole file and log record is flushed) otherwise.
"""
import errno
import hashlib
import logging
import os
import re
import stat
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from esm_gearnet import writing
from esm_gearnet.commands.main import main
from tests.conftest import STRUCTURES, run_dir_of

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "config" / "demo" / "esm_gearnet.yaml"
SMALL = ["--num_protein", "16", "--batch_norm", "False", "--batch_size", "4"]
INPUTS = ["1D66-A.pdb", "2N2U-A.pdb"]
UMASK = 0o027  # the run of the module fixture is written under this umask: its files are 0640


def _hashes(folder: Path):
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.endswith(".lock")}


def _leftovers(folder: Path):
    return [p for p in folder.rglob(".*") if p.is_file() and "@" in p.name]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A fine-tuning run of one epoch, written under umask 027 (see `test_outputs_honour_the_umask`)."""
    if not STRUCTURES.exists():
        pytest.skip("../shared/data is absent: these tests embed real structures")
    out = tmp_path_factory.mktemp("trained")
    old = os.umask(UMASK)
    try:
        assert main(["downstream", "-c", str(DEMO), *SMALL, "--num_epoch", "1", "--output_dir", str(out)]) == 0
        run = run_dir_of(out)
        assert main(["embed", "--ckpt", str(run), *[str(STRUCTURES / f) for f in INPUTS], "-o",
                     str(out / "emb.npz"), "--quiet"]) == 0
    finally:
        os.umask(old)
        logging.getLogger("esm_gearnet").handlers.clear()
    return run


@pytest.fixture
def cli(capsys):
    def run(*args):
        code = main([str(a) for a in args])
        return code, *capsys.readouterr()
    return run


def inject(monkeypatch, name: str, code: int = errno.ENOSPC):
    """The writer refuses the file `name` (its temporary file `.NAME.PID@HOST.xxxxxxxx`, or a log of that name), as
    a full disk (or `code`) would."""
    real = writing._sync

    def refusing(handle):
        base = os.path.basename(str(getattr(handle, "name", "")))
        temporary = writing._TEMPORARY.fullmatch(base)
        if base == name or temporary and temporary["name"] == name:
            raise OSError(code, os.strerror(code))
        real(handle)
    monkeypatch.setattr(writing, "_sync", refusing)


def _inputs():
    return [str(STRUCTURES / f) for f in INPUTS]


# ---- a full disk while writing: one sentence, the previous file intact ------------------------------------------
FULL = "the disk holding it is full (No space left on device); free space in"


def test_full_disk_while_predict_writes_keeps_the_previous_csv(trained, tmp_path, cli, monkeypatch):
    out, scores = tmp_path / "predictions.csv", tmp_path / "scores.npz"
    assert cli("predict", "--ckpt", trained, *_inputs(), "-o", out, "--scores", scores, "--quiet")[0] == 0
    before = _hashes(tmp_path)
    for name in ("predictions.csv", "scores.npz"):
        monkeypatch.undo()
        inject(monkeypatch, name)
        code, _, err = cli("predict", "--ckpt", trained, *_inputs(), "-o", out, "--scores", scores, "--quiet")
        assert code == 2 and err.count("\n") == 1, err
        assert f"error: cannot write {tmp_path / name}: {FULL} {tmp_path}" in err
        assert _hashes(tmp_path) == before and not _leftovers(tmp_path)


@pytest.mark.parametrize("suffix", [".npz", ".pt"])
def test_full_disk_while_embed_writes_keeps_the_previous_file(trained, tmp_path, cli, monkeypatch, suffix):
    out = tmp_path / f"emb{suffix}"
    assert cli("embed", "--ckpt", trained, _inputs()[0], "-o", out, "--quiet")[0] == 0
    before = _hashes(tmp_path)
    inject(monkeypatch, out.name)
    code, _, err = cli("embed", "--ckpt", trained, *_inputs(), "-o", out, "--resume", "--quiet")
    assert code == 2 and err == f"error: cannot write {out}: {FULL} {tmp_path} (or choose another location) and " \
                                "run the command again; the files already there are intact.\n"
    assert _hashes(tmp_path) == before and not _leftovers(tmp_path)


def test_full_disk_while_a_checkpoint_is_saved_keeps_the_last_one(trained, tmp_path, cli, monkeypatch):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = _hashes(run)
    inject(monkeypatch, "last.pth")
    code, _, err = cli("downstream", "--resume", run, "--train.num_epoch", "2")
    assert code == 2 and f"error: cannot write {run / 'last.pth'}: {FULL} {run}" in err
    assert err.count("error:") == 1 and "Traceback" not in err
    after = _hashes(run)
    assert after[Path("last.pth")] == before[Path("last.pth")] and not _leftovers(run)
    assert (run / "log.txt").read_text().count(f"error: cannot write {run / 'last.pth'}") == 1


def test_full_disk_while_a_cache_is_written_is_one_sentence(tmp_path, monkeypatch):
    from esm_gearnet.data.datasets.cache import load_or_build

    if not STRUCTURES.exists():
        pytest.skip("../shared/data is absent")
    cache = tmp_path / "cache.pt"
    load_or_build([STRUCTURES / INPUTS[0]], cache, workers=0, progress=False)
    before = _hashes(tmp_path)
    inject(monkeypatch, "cache.pt")
    with pytest.raises(writing.OutputError, match=re.escape(f"cannot write {cache}: {FULL}")):
        load_or_build([STRUCTURES / f for f in INPUTS], cache, workers=0, progress=False)
    after = _hashes(tmp_path)
    assert after[Path("cache.pt")] == before[Path("cache.pt")] and not _leftovers(tmp_path)


# ---- a location that takes no file: refused before the work -----------------------------------------------------
@contextmanager
def mounted(kind: str, folder: Path):
    """A real read-only bind mount or a 64 KiB tmpfs filled to the last byte at `folder` (skipped where mounting is
    not permitted)."""
    folder.mkdir(exist_ok=True)
    command = ["mount", "--bind", str(folder), str(folder)] if kind == "read-only" else \
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)]
    if subprocess.run(command, capture_output=True).returncode != 0:
        pytest.skip(f"mounting a {kind} file system is not permitted here; the injected faults cover the sentence")
    try:
        if kind == "read-only":
            subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], check=True, capture_output=True)
        else:
            filler = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
            try:
                while True:
                    os.write(filler, b"\0" * 4096)
            except OSError:
                pass
            finally:
                os.close(filler)
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@pytest.fixture
def no_work(monkeypatch):
    """Building the model or the dataset fails the test: the location must be refused before."""
    from esm_gearnet.commands import embed, finetune, predict

    def work(*args, **kwargs):
        raise AssertionError("the work began before the output location was checked")
    monkeypatch.setattr(embed, "load_run", work)
    monkeypatch.setattr(predict, "load_run", work)
    monkeypatch.setattr(finetune, "build_downstream", work)


READ_ONLY = "its location is read-only or not writable (Read-only file system); choose a writable location"


@pytest.mark.parametrize("kind, said", [("read-only", READ_ONLY), ("full", "the disk holding it is full")])
@pytest.mark.parametrize("command", ["embed", "predict", "downstream"])
def test_a_location_that_takes_no_file_is_refused_before_the_work(tmp_path, cli, no_work, kind, said, command):
    with mounted(kind, tmp_path / "mnt") as folder:
        before = _hashes(folder)
        target = folder / "out" / "x.npz" if command == "embed" else folder / "x.csv"
        if command == "downstream":
            code, _, err = cli("downstream", "-c", DEMO, "--output_dir", folder / "runs")
            target = folder / "runs"
        else:
            ckpt = ["--ckpt", tmp_path] if command == "predict" else ["-c", DEMO]
            code, _, err = cli(command, *ckpt, _inputs()[0], "-o", target, "--quiet")
        assert code == 2 and err.count("\n") == 1 and f"error: cannot write {target}" in err and said in err, err
        assert _hashes(folder) == before


def test_injected_read_only_location_is_the_same_sentence(tmp_path, cli, no_work, monkeypatch):
    """Where nothing can be mounted: EROFS at the test write gives the sentence of the real read-only mount."""
    real = writing.tempfile.mkstemp

    def read_only(*args, **kwargs):
        if str(kwargs.get("dir", "")).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real(*args, **kwargs)
    monkeypatch.setattr(writing.tempfile, "mkstemp", read_only)
    (tmp_path / "ro").mkdir()
    code, _, err = cli("embed", "-c", DEMO, _inputs()[0], "-o", tmp_path / "ro" / "x.npz", "--quiet")
    assert code == 2 and f"error: cannot write {tmp_path / 'ro' / 'x.npz'}: {READ_ONLY}" in err


# ---- two writers ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["embed", "predict"])
def test_a_second_writer_of_an_output_is_refused(trained, tmp_path, cli, command):
    out = tmp_path / ("emb.npz" if command == "embed" else "predictions.csv")
    assert cli(command, "--ckpt", trained, _inputs()[0], "-o", out, "--quiet")[0] == 0
    before = _hashes(tmp_path)
    with writing.output_lock(out):  # the first command, still writing
        code, _, err = cli(command, "--ckpt", trained, *_inputs(), "-o", out, "--quiet",
                           *(["--resume"] if command == "embed" else []))
    assert code == 2 and err == (f"error: another command is writing the output {out} (it holds {out.parent / ('.' + out.name + '.lock')}); wait "
                                 "for it to finish, or write elsewhere.\n")
    assert _hashes(tmp_path) == before


def test_a_second_training_in_one_run_directory_is_refused(trained, cli):
    before = _hashes(trained)
    with writing.output_lock(trained):
        code, _, err = cli("downstream", "--resume", trained, "--train.num_epoch", "2")
    assert code == 2 and err == (f"error: another command is writing the run directory {trained} (it holds "
                                 f"{trained / '.lock'}); wait for it to finish, or write elsewhere.\n")
    assert _hashes(trained) == before


def test_a_second_build_of_a_cache_waits_and_reads_the_first(tmp_path, caplog):
    from esm_gearnet.data.datasets.cache import FORMAT, cached

    cache, results = tmp_path / "cache.pt", []
    first = {"fields": {}, "made_by": "first"}

    def second():
        results.append(cached(cache, "K", build=lambda: {"made_by": "second"}, check=lambda state: None))
    with caplog.at_level(logging.INFO, logger="esm_gearnet"):
        with writing.output_lock(cache, wait=True):  # the first build
            thread = threading.Thread(target=second)
            thread.start()
            time.sleep(0.5)
            assert thread.is_alive()  # waiting
            from esm_gearnet.checkpoint import save_atomic
            save_atomic(dict(first, format=FORMAT, key="K"), cache)
        thread.join(30)
    assert results and results[0]["made_by"] == "first"
    assert f"another process is writing {cache}; waiting for it to finish" in caplog.text


# ---- file modes -------------------------------------------------------------------------------------------------
def test_outputs_honour_the_umask(trained):
    written = [trained / name for name in ("config.yaml", "last.pth", "best.pth", "metrics.jsonl", "curves.png",
                                           "log.txt")] + [trained.parents[3] / "emb.npz"]
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in written}
    assert set(modes.values()) == {oct(0o666 & ~UMASK)}, modes


def test_the_atomic_writer_keeps_the_old_file_on_any_failure(tmp_path, monkeypatch):
    path = tmp_path / "a.txt"
    writing.write_atomic(path, "old")
    with pytest.raises(RuntimeError):
        with writing.replacing(path) as temporary:
            temporary.write_text("half")
            raise RuntimeError("the writer failed")
    inject(monkeypatch, "a.txt", errno.EDQUOT)
    with pytest.raises(writing.OutputError, match="the quota holding it is full"):
        writing.write_atomic(path, "new")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_a_log_that_stops_taking_lines_warns_once(tmp_path, capsys):
    from esm_gearnet.commands.run import _LogFile

    handler = _LogFile(tmp_path / "log.txt")
    handler.stream.write = lambda text: (_ for _ in ()).throw(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    log = logging.getLogger("esm_gearnet.test_log_file")
    log.addHandler(handler)
    try:
        for line in ("one", "two", "three"):
            log.warning(line)
    finally:
        log.removeHandler(handler)
    err = capsys.readouterr().err
    assert err == (f"warning: {tmp_path / 'log.txt'} cannot be written any more ([Errno 28] No space left on device); "
                   "the log goes to stderr only.\n")


def test_a_real_full_disk_during_a_checkpoint_save_is_one_sentence(tmp_path):
    """torch.save on a full disk raises its zip writer's `unexpected pos` RuntimeError; the writer finds the
    ENOSPC under it and says the sentence, and the previous checkpoint stays whole."""
    import torch

    from esm_gearnet import checkpoint

    folder = tmp_path / "small"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs is not permitted here; the injected faults cover the sentence")
    try:
        checkpoint.save_atomic({"weights": torch.zeros(1000)}, folder / "last.pth")
        before = _hashes(folder)
        with pytest.raises(writing.OutputError, match=re.escape(f"cannot write {folder / 'last.pth'}: {FULL}")):
            checkpoint.save_atomic({"weights": torch.zeros(200_000)}, folder / "last.pth")
        assert _hashes(folder) == before and not _leftovers(folder)
        assert checkpoint.load(folder / "last.pth")["weights"].shape == (1000,)
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_a_valid_cache_in_a_read_only_folder_is_read(tmp_path):
    """A shared, read-only dataset folder serves its cache: the lock is taken only to build one."""
    from esm_gearnet.data.datasets.cache import load_or_build

    if not STRUCTURES.exists():
        pytest.skip("../shared/data is absent")
    files = [STRUCTURES / f for f in INPUTS]
    folder = tmp_path / "data"
    folder.mkdir()
    built, _ = load_or_build(files, folder / "cache.pt", workers=0, progress=False)
    (folder / ".cache.pt.lock").unlink()  # as a folder that someone else built and shared would be
    with mounted("read-only", folder):
        read, skipped = load_or_build(files, folder / "cache.pt", workers=0, progress=False)
        assert [read[i].name for i in range(len(read))] == [built[i].name for i in range(len(built))] and not skipped
