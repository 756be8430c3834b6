"""Inputs that are not what they claim: each is skipped and reported (one row of `OUT.skipped.tsv` naming it)
when it is one bad input among good ones, or refused in one sentence naming the file (and line or key) with exit
code 2 where it ends a command; never an abort, a hang or a balloon, and nothing that existed is lost. One table
row per case; bombs are bounded by module constants the tests lower, so every input here stays a few KiB."""
import gzip
import hashlib
import os
import re
import socket
import stat
import tracemalloc
import zipfile
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch

from conftest import STRUCTURES, atom_table
from esm_gearnet.data.datasets import LMDBFile, write_lmdb
from esm_gearnet.data.datasets import atom3d

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "config" / "demo" / "esm_gearnet.yaml"
GOOD = "1D66-A.pdb"  # the one good input of every embed case


@pytest.fixture(autouse=True)
def _needs_shared_data():
    if not STRUCTURES.exists():
        pytest.skip("../shared/data is absent: these tests embed real structures")


def _snapshot(*folders):
    """sha256 of every regular file under the folders (a FIFO or socket is listed, never opened); the empty lock
    files a command leaves beside its outputs (`writing.output_lock`) are left out."""
    state = {}
    for folder in folders:
        for path in sorted(Path(folder).rglob("*")):
            if path.name.endswith(".lock"):
                continue
            mode = path.lstat().st_mode
            state[str(path)] = (hashlib.sha256(path.read_bytes()).hexdigest() if stat.S_ISREG(mode)
                                else stat.S_IFMT(mode))
    return state


def _link_good(folder):
    """`folder`, made, holding a link to the real good structure (the real files are never copied); returns
    its name relative to the test's folder, as a user types it."""
    folder.mkdir()
    (folder / GOOD).symlink_to(STRUCTURES / GOOD)
    return folder.name


# ---- embed: inputs that are not structures -----------------------------------------------------------------
def _binary(tmp):
    (tmp / "weights.bin").write_bytes(bytes(range(256)) * 8)  # the case: 0xb7 and NUL bytes
    return [_link_good(tmp / "in"), "weights.bin"], [
        ("weights.bin", r"not a list of paths: it is binary \(a NUL byte at offset 0\)")]


def _latin1(tmp):
    (tmp / "names.txt").write_bytes(f"{STRUCTURES / GOOD}\ncaf\xb7\n".encode("latin-1"))
    return [_link_good(tmp / "in"), "names.txt"], [
        ("names.txt", r"not a list of paths: it is not UTF-8 text \(byte 0xb7 at offset \d+\)")]


def _not_paths(tmp):
    (tmp / "labels.csv").write_text("id,score\n1abc,0.5\n2xyz,0.7\n")
    return [_link_good(tmp / "in"), "labels.csv"], [
        ("labels.csv", r"not a list of paths: none of its 3 line\(s\) names an existing file or folder \(line 1: "
                       r"'id,score'\)")]


def _missing_line(tmp):
    (tmp / "list.txt").write_text(f"\n{STRUCTURES / GOOD}\nnot_here.pdb\n")
    return ["list.txt"], [("not_here.pdb", r"no such file or folder \(line 3 of list\.txt\)")]


def _fifo(tmp):
    os.mkfifo(tmp / _link_good(tmp / "bad") / "pipe.pdb")  # a structure's name: opening it would wait forever
    return ["bad"], [("bad/pipe.pdb", r"a FIFO \(named pipe\), not a file: it was not opened")]


def _socket(tmp):
    bad = _link_good(tmp / "bad")
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(str(tmp / bad / "s.cif"))
    except OSError as error:
        pytest.skip(f"no unix socket here: {error}")
    finally:
        server.close()
    return ["bad"], [("bad/s.cif", r"a socket, not a file: it was not opened")]


def _lists_itself(tmp):
    (tmp / "self.txt").write_text(f"{STRUCTURES / GOOD}\nself.txt\n")
    return ["self.txt"], [("self.txt", r"a list of paths already being read \(a cycle of lists: {tmp}/self\.txt -> "
                                        r"{tmp}/self\.txt\); it is read once \(line 2 of self\.txt\)")]


def _list_cycle(tmp):
    (tmp / "a.txt").write_text("b.txt\n")
    (tmp / "b.txt").write_text(f"{STRUCTURES / GOOD}\na.txt\n")
    return ["a.txt"], [("a.txt", r"a cycle of lists: {tmp}/a\.txt -> {tmp}/b\.txt -> {tmp}/a\.txt\); it is read "
                                 r"once \(line 2 of b\.txt\)")]


def _link_loops(tmp):
    bad = tmp / _link_good(tmp / "bad")
    (bad / "loop.pdb").symlink_to("loop.pdb")
    (bad / "sub").mkdir()
    (bad / "sub" / "up").symlink_to("..")
    (bad / "gone.pdb").symlink_to("nowhere.pdb")
    return ["bad"], [("bad/gone.pdb", r"a symbolic link to nowhere\.pdb, which does not exist"),
                     ("bad/loop.pdb", r"a loop of symbolic links: it names no file"),
                     ("bad/sub/up", r"a link to the folder {tmp}/bad, which was already read: a loop of links")]


EMBED_CASES = {"binary file": _binary, "list not UTF-8": _latin1, "lines are not paths": _not_paths,
               "list line names nothing": _missing_line, "FIFO in a folder": _fifo, "socket in a folder": _socket,
               "list lists itself": _lists_itself, "cycle of lists": _list_cycle,
               "folder with link loops": _link_loops}


@pytest.mark.parametrize("case", EMBED_CASES)
def test_embed_skips_and_reports_an_input_that_is_not_a_structure(cli, tmp_path, case, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the inputs are given as relative paths, as a user types them
    inputs, rows = EMBED_CASES[case](tmp_path)  # the good structure among them once, beside or inside the bad
    before = _snapshot(tmp_path)
    code, out, err = cli("embed", "-c", CONFIG, *inputs, "-o", "out.npz", "--quiet", "--workers", "0")
    assert code == 0, err
    assert f"embedded 1 protein(s) into out.npz; {len(rows)} input(s) skipped" in out
    assert list(np.load(tmp_path / "out.npz")["ids"]) == [GOOD[:-4]]  # the good input is still embedded
    report = [line.split("\t") for line in (tmp_path / "out.npz.skipped.tsv").read_text().splitlines()]
    assert [name for name, _ in report] == [name for name, _ in rows]
    for (name, reason), (_, pattern) in zip(report, rows):
        assert reason.startswith(f"{name}: ") and re.search(pattern.format(tmp=re.escape(str(tmp_path))), reason)
    after = _snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing that existed changed


# ---- label CSVs of ProteinFolder -----------------------------------------------------------------------------
NAMES = ["1D66-A", "2N2U-A", "1ORC-A"]
LABEL_CASES = {
    # case: (CSV text, what the sentence says after the file's path)
    "duplicated id": ("id,score\n1D66-A,0.1\n2N2U-A,0.2\n\n1D66-A,0.3\n",
                      r", lines 2 and 5: both rows give the id '1D66-A'; keep one row per protein\."),
    "inf label": ("id,score\n1D66-A,0.1\n2N2U-A,inf\n",
                  r", line 3, column 'score': 'inf' is not a finite number; leave the cell empty"),
    "nan label": ("id,score\n1D66-A,nan\n2N2U-A,0.2\n",
                  r", line 2, column 'score': 'nan' is not a finite number; leave the cell empty"),
    "missing cell": ("id,score,split\n1D66-A,0.1,train\n2N2U-A,0.2\n",
                     r", line 3: the row has 2 cells for the header's 3 columns; give every column a cell"),
    "decimal comma": ("id,score\n1D66-A,0,1\n", r", line 2: the row has 3 cells for the header's 2 columns"),
    "text label": ("id,score\n1D66-A,high\n", r", line 2, column 'score': 'high' is not a number\."),
    "not UTF-8": ("id,score\n1D66-A,0.1\n2N2U-\xb7,0.2\n", r": the label CSV is not UTF-8 text \(byte 0xb7\)"),
}


def _structures(folder):
    """A folder of links to the real structures of NAMES."""
    folder.mkdir()
    for name in NAMES:
        (folder / f"{name}.pdb").symlink_to(STRUCTURES / f"{name}.pdb")
    return folder


def _downstream_config(tmp_path, dataset: str) -> Path:
    """The demo config with its dataset block replaced (`dataset`: YAML lines indented by two spaces)."""
    text = CONFIG.read_text()
    start = text.index("dataset:\n") + len("dataset:\n")
    end = text.index("  transform:", start)
    config = tmp_path / "config.yaml"
    config.write_text(text[:start] + dataset + text[end:])
    return config


@pytest.mark.parametrize("case", LABEL_CASES)
def test_label_csv_fault_is_one_sentence_naming_file_and_line(cli, tmp_path, case):
    content, expected = LABEL_CASES[case]
    folder = _structures(tmp_path / "in")
    labels = tmp_path / "labels.csv"
    labels.write_bytes(content.encode("latin-1"))
    config = _downstream_config(tmp_path, f"  class: ProteinFolder\n  path: {folder}\n  labels: {labels}\n"
                                          "  task: regression\n  workers: 0\n  progress: false\n")
    before = _snapshot(tmp_path)
    code, _, err = cli("downstream", "-c", config, "--output_dir", tmp_path / "runs")
    assert code == 2 and "Traceback" not in err
    assert re.fullmatch(f"error: {re.escape(str(labels))}{expected}.*", err.splitlines()[-1]), err
    assert not (tmp_path / "labels.cache.pt").exists()  # refused before any structure was read
    assert {k: v for k, v in _snapshot(tmp_path).items() if k in before} == before


def test_label_csv_with_a_byte_order_mark_reads_its_ids(tmp_path):
    from esm_gearnet.data.datasets import ProteinFolder

    folder = _structures(tmp_path / "in")
    labels = tmp_path / "labels.csv"
    labels.write_bytes("\ufeffid,score\n".encode() + "".join(f"{n},{i}\n" for i, n in enumerate(NAMES)).encode())
    dataset = ProteinFolder(folder, labels, split=[1.0, 0.0, 0.0], workers=0, progress=False)
    assert dataset.tasks == ["score"]
    assert sorted(zip(dataset.proteins.files, dataset.targets[:, 0].tolist())) == sorted(
        (str(folder / f"{n}.pdb"), float(i)) for i, n in enumerate(NAMES))


# ---- bombs: bounded before they inflate ----------------------------------------------------------------------
def _psr(root, items_per_split=1):
    """A small PSR dataset of real structures (ATOM3D's layout): {split: its LMDB folder}."""
    base = root / "PSR-split-by-year" / "split-by-year" / "data"
    lmdbs = {}
    for k, split in enumerate(("train", "val", "test")):
        items = [{"id": str(("T0950", f"decoy{k}{i}")), "atoms": atom_table(STRUCTURES / GOOD, 0.5, seed=k + i),
                  "scores": {"gdt_ts": 0.5}} for i in range(items_per_split)]
        write_lmdb(base / split, items)
        lmdbs[split] = base / split
    return lmdbs


def _put(path, records):
    env = lmdb.open(str(path), map_size=1 << 30)
    with env.begin(write=True) as txn:
        for key, value in records.items():
            txn.put(key, value)
    env.close()


def test_gzip_bomb_item_is_skipped_without_inflating_it(tmp_path, monkeypatch):
    monkeypatch.setattr(atom3d, "MAX_ITEM_BYTES", 1 << 20)
    lmdbs = _psr(tmp_path, items_per_split=2)
    bomb = gzip.compress(bytes(32 << 20))  # 32 MiB of zeros in 32 KiB
    _put(lmdbs["train"], {b"2": bomb, b"num_examples": b"3"})
    reader = LMDBFile(lmdbs["train"])
    tracemalloc.start()
    try:
        with pytest.raises(atom3d.LMDBError) as error:
            reader[2]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(error.value)
    del reader, error  # closes its LMDB environment (the traceback holds it too): a process opens one once
    assert message == (f"{lmdbs['train']}: item 2 inflates past 1 MiB from {len(bomb)} bytes (a "
                                "decompression bomb, or raise esm_gearnet.data.datasets.atom3d.MAX_ITEM_BYTES if the "
                                "item is genuine); it was not inflated further.")
    assert peak < 4 << 20  # the 32 MiB were never held
    before = _snapshot(tmp_path)
    dataset = atom3d.PSRDataset(tmp_path, workers=0, progress=False)
    assert dataset.num_samples == [2, 2, 2]  # the good items of the same LMDB are still read
    report = tmp_path / "PSR-split-by-year" / "PSR-split-by-year.cache.pt.skipped.tsv"
    rows = [line.split("\t") for line in report.read_text().splitlines()]
    assert rows == [[str(lmdbs["train"]), message]]
    assert {k: v for k, v in _snapshot(tmp_path).items() if k in before} == before


@pytest.mark.parametrize("declared, expected", [
    (b"3000000", "num_examples declares 3000000 items, but the LMDB holds 4 records in all; it is damaged"),
    (b"-1", "num_examples declares -1 items, but the LMDB holds 4 records in all"),
    (b"lots", "num_examples is b'lots', not a whole number"),
])
def test_lmdb_declaring_more_items_than_it_holds_is_refused(cli, tmp_path, declared, expected):
    lmdbs = _psr(tmp_path)
    for path in lmdbs.values():  # the case: three small LMDBs each declaring millions of items
        _put(path, {b"num_examples": declared})
    config = _downstream_config(tmp_path, f"  class: PSRDataset\n  path: {tmp_path}\n  workers: 0\n"
                                          "  progress: false\n")
    before = _snapshot(tmp_path)
    code, _, err = cli("downstream", "-c", config, "--output_dir", tmp_path / "runs")
    assert code == 2 and "Traceback" not in err
    sentence = err.splitlines()[-1]
    assert sentence.startswith(f"error: {lmdbs['train']}: {expected}") and sentence.endswith(": download it again.")
    assert not [p for p in tmp_path.glob("PSR-split-by-year/*.cache.pt*")
                if not p.name.endswith(".lock")]  # no cache, no skipped.tsv of 3M rows
    assert {k: v for k, v in _snapshot(tmp_path).items() if k in before} == before


def _encoder_state():
    from esm_gearnet.assembly import build_encoder
    from esm_gearnet.config import load_config

    torch.manual_seed(0)
    return build_encoder(load_config(str(CONFIG))).state_dict()


def test_checkpoint_with_a_deflated_giant_is_refused_unread(cli, tmp_path, monkeypatch):
    plain = tmp_path / "plain.pth"
    torch.save({**_encoder_state(), "extra": torch.zeros(8 << 20)}, plain)  # 32 MiB of zeros
    bomb = tmp_path / "bomb.pth"
    with zipfile.ZipFile(plain) as source, zipfile.ZipFile(bomb, "w") as target:
        for entry in source.infolist():
            target.writestr(entry.filename, source.read(entry), compress_type=zipfile.ZIP_DEFLATED)
    plain.unlink()

    def inflating(*args, **kwargs):
        raise AssertionError("torch.load was reached")

    monkeypatch.setattr(torch, "load", inflating)
    before = _snapshot(tmp_path)
    code, _, err = cli("embed", "-c", CONFIG, "--ckpt", bomb, STRUCTURES / GOOD, "-o", tmp_path / "out.npz")
    assert code == 2 and err.count("\n") == 1
    assert re.fullmatch(rf"error: checkpoint {re.escape(str(bomb))} declares \d+ bytes in its \d+ zip entries "
                        r"\(plain/data/\d+: 33554432 bytes, compressed in \d+\), far beyond the file's \d+ bytes "
                        r"\(torch stores tensors uncompressed\): a decompression bomb, refused before anything was "
                        r"inflated; use another checkpoint .*\n", err), err
    assert not (tmp_path / "out.npz").exists() and _snapshot(tmp_path) == before


@pytest.mark.parametrize("zip_format", [True, False], ids=["torch zip", "old pickle format"])
def test_bare_state_dicts_of_both_torch_formats_still_load(cli, tmp_path, zip_format):
    weights = tmp_path / "model.pth"
    torch.save(_encoder_state(), weights, _use_new_zipfile_serialization=zip_format)
    code, out, err = cli("embed", "-c", CONFIG, "--ckpt", weights, STRUCTURES / GOOD, "-o", tmp_path / "out.npz",
                         "--quiet", "--workers", "0")
    assert code == 0 and "embedded 1 protein(s)" in out, err
