"""`esm-gearnet pack`: real structures into a FoldComp database that reads back within the Cα bound, the official
layout written by hand reading the same, AlphaFold DB tars read member by member, a pack killed with SIGKILL and
continued equal to one never killed, damaged databases refused entry by entry, and the command's refusals."""
import gzip
import io
import os
import signal
import struct
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from conftest import ALPHAFOLD, STRUCTURES, _require, run_command

ROOT = Path(__file__).resolve().parents[1]
DB_FILES = ("", ".index", ".lookup", ".dbtype", ".source")
# the chains of ../shared/data with breaks (consecutive Cα more than 4.2 Å apart): FoldComp cannot represent them
BROKEN = {"103L-A", "1HWU-A", "1N7G-A", "1OSN-A", "2EFJ-A", "2JDO-A", "2XHE-A", "2XHE-B", "3SN6-R", "5YH2-A",
          "6A5K-A"}


def pack(*args):
    """`esm-gearnet pack ARGS` in this process: (exit code, stdout, stderr)."""
    import contextlib

    from esm_gearnet.commands.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(["pack", *map(str, args), "--quiet"])
        except SystemExit as exit_:  # argparse
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


def read_back(path):
    """{name: Protein} of every entry of the database at `path`, through FoldCompDB."""
    from esm_gearnet.data.datasets.foldcomp import FoldCompDB

    dataset = FoldCompDB(path)
    return {dataset.name(i): dataset.protein(i) for i in range(len(dataset))}


def skipped_rows(path):
    report = Path(f"{path}.skipped.tsv")
    return [line.split("\t") for line in report.read_text().splitlines()] if report.exists() else []


def ca_error(protein, reference):
    return float((protein.atom_pos[:, 1].double() - reference.atom_pos[:, 1].double()).norm(dim=-1).max())


def af_tar(path, with_cif=True):
    """An AlphaFold-DB-like proteome tar of the models in ../shared/data/alphafold: per model a confidence .json.gz,
    a .cif.gz that is not a structure (so that reading it instead of the .pdb.gz fails) and the .pdb.gz."""
    with tarfile.open(path, "w") as tar:
        for model in sorted(_require(ALPHAFOLD).glob("*.pdb")):
            stem = model.name[:-len(".pdb")]
            members = [(stem.replace("-model_", "-confidence_") + ".json.gz", gzip.compress(b'{"plddt": []}'))]
            if with_cif:
                members.append((stem + ".cif.gz", gzip.compress(b"data_not_a_structure\n")))
            members.append((stem + ".pdb.gz", gzip.compress(model.read_bytes())))
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


# ---- the real structures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def packed_real(tmp_path_factory):
    """Every real structure (41 PDB, 2 mmCIF, 3 AlphaFold models) packed with 2 workers: (DB, exit, stdout)."""
    _require(STRUCTURES)
    db = tmp_path_factory.mktemp("real") / "real"
    code, out, err = pack(STRUCTURES, ALPHAFOLD, "-o", db, "--workers", "2")
    assert code == 0, err
    return db, out


def test_real_structures_read_back_within_the_bound(packed_real):
    from esm_gearnet.data import load_structure

    db, out = packed_real
    files = {p.name.rsplit(".", 1)[0]: p for p in sorted(STRUCTURES.iterdir()) + sorted(ALPHAFOLD.iterdir())}
    entries = read_back(db)
    assert set(entries) == set(files) - BROKEN
    errors = {"alphafold": [], "experimental": []}
    for name, protein in entries.items():
        reference = load_structure(files[name])
        assert protein.sequence == reference.sequence, name
        assert protein.num_residue == reference.num_residue
        error = ca_error(protein, reference)
        assert error <= 1.0, name
        errors["alphafold" if name.startswith("AF-") else "experimental"].append(error)
        # pLDDT / B-factor: FoldComp keeps it in steps of about 1/500 of the chain's range (0.2 % measured)
        spread = float(reference.bfactor.max() - reference.bfactor.min())
        assert float((protein.bfactor - reference.bfactor).abs().max()) <= 0.003 * spread + 0.01, name
    assert max(errors["alphafold"]) < 0.5 and max(errors["experimental"]) < 0.5, errors
    rows = skipped_rows(db)
    assert {Path(source).name.rsplit(".", 1)[0] for source, _ in rows} == BROKEN
    for source, reason in rows:
        assert reason.startswith(f"{source}, chain ") and "FoldComp cannot represent its chain break" in reason
        assert "Cα error" in reason and "--split-breaks packs its" in reason
    assert out.strip() == (f"packed {len(entries)} chain(s) from 46 input(s) into {db}; 11 left out, listed in "
                           f"{db}.skipped.tsv")


def test_foldcomp_itself_reads_what_pack_wrote(packed_real):
    import foldcomp

    db, _ = packed_real
    with foldcomp.open(str(db), ids=["6MRR-A", "AF-A7YWM6-F1-model_v4"]) as database:
        names = [name for name, pdb in database if pdb.startswith("TITLE")]
    assert names == ["6MRR-A", "AF-A7YWM6-F1-model_v4"]


def test_broken_chains_split_into_segments_that_read_back(tmp_path):
    from esm_gearnet.data import load_structure
    from esm_gearnet.data.packing import chain_breaks

    files = [_require(STRUCTURES) / name for name in ("103L-A.pdb", "6A5K-A.cif", "6MRR-A.pdb")]
    db = tmp_path / "segments"
    code, out, err = pack(*files, "-o", db, "--split-breaks", "--workers", "1")
    assert code == 0, err
    entries = read_back(db)
    for file in files:
        reference = load_structure(file)
        stem = file.name.rsplit(".", 1)[0]
        parts = np.split(np.arange(reference.num_residue), chain_breaks(reference.pos.numpy()))
        names = [stem] if len(parts) == 1 else [f"{stem}_seg{k}" for k in range(1, len(parts) + 1)]
        for name, rows in zip(names, parts):
            protein = entries.pop(name)
            assert protein.sequence == "".join(reference.sequence[i] for i in rows), name
            expected = reference.atom_pos[rows, 1].double()
            assert float((protein.atom_pos[:, 1].double() - expected).norm(dim=-1).max()) <= 1.0, name
    assert not entries and skipped_rows(db) == []
    assert "entries (chains, or segments of broken chains)" in out


def test_a_foldcomp_crash_costs_only_its_structure(tmp_path, monkeypatch):
    """foldcomp.compress really crashes (SIGSEGV) on 1DIX-A's raw text: a pack whose encoder is made to hand it that
    text lists the file with the crash and packs the rest (the workers are forked: they see the patch)."""
    import faulthandler

    import foldcomp

    from esm_gearnet.data import packing

    crashing = _require(STRUCTURES) / "1DIX-A.pdb"
    encode = packing.encode

    def encode_or_crash(arrays, rows, chain_id, name):
        if name == "1DIX-A":
            faulthandler.disable()  # in the worker: no Python stack dump of the expected crash
            foldcomp.compress(name, crashing.read_text())  # SIGSEGV in foldcomp 1.0.0
        return encode(arrays, rows, chain_id, name)

    monkeypatch.setattr(packing, "encode", encode_or_crash)
    db = tmp_path / "crash"
    code, out, err = pack(STRUCTURES / "1BC8-C.pdb", crashing, STRUCTURES / "6MRR-A.pdb", "-o", db, "--workers", "1")
    assert code == 0, err
    assert list(read_back(db)) == ["1BC8-C", "6MRR-A"]
    (row,) = skipped_rows(db)
    assert row[0] == str(crashing)
    assert row[1] == (f"{crashing}: foldcomp crashed (SIGSEGV) on it, also when run again alone in a fresh process; "
                      "it is left out.")


def test_unknown_residues_and_bad_files_among_good_ones(tmp_path):
    """An unknown residue (UNK: FoldComp keeps its N, CA, C) packs and reads back as X; a damaged file, a chain of
    one residue, a list line naming nothing, a file named twice and another file with the same entry name are
    listed with their reasons, and the good files are packed."""
    from esm_gearnet.data import load_structure

    model = _require(ALPHAFOLD) / "AF-A7YWM6-F1-model_v4.pdb"
    lines = model.read_text().splitlines(keepends=True)
    unknown = tmp_path / "unknown.pdb"
    unknown.write_text("".join(line[:17] + "UNK" + line[20:] if line.startswith("ATOM") and line[22:26] == "   5"
                               and line[12:16].strip() in ("N", "CA", "C", "O", "CB") else line
                               for line in lines if not (line.startswith("ATOM") and line[22:26] == "   5"
                                                         and line[12:16].strip() not in ("N", "CA", "C", "O", "CB"))))
    single = tmp_path / "single.pdb"
    single.write_text("".join(line for line in lines if line.startswith("ATOM") and line[22:26] == "   1"))
    damaged = tmp_path / "damaged.pdb"
    damaged.write_text("ATOM      1  CA  ALA A   1    garbage\n")
    namesake = tmp_path / "copy" / model.name  # another file whose entry would have the same name
    namesake.parent.mkdir()
    namesake.write_bytes(model.read_bytes())
    listing = tmp_path / "inputs.txt"
    listing.write_text(f"{model}\nunknown.pdb\nsingle.pdb\ndamaged.pdb\nmissing.pdb\ncopy\n")
    db = tmp_path / "out" / "db"
    code, out, err = pack(listing, model, "-o", db)
    assert code == 0, err
    entries = read_back(db)
    assert list(entries) == ["AF-A7YWM6-F1-model_v4", "unknown"]
    reference = load_structure(unknown)
    assert reference.sequence[4] == "X" and entries["unknown"].sequence == reference.sequence
    assert ca_error(entries["unknown"], reference) < 1.0
    reasons = dict(skipped_rows(db))
    assert set(reasons) == {str(tmp_path / n) for n in ("single.pdb", "damaged.pdb", "missing.pdb")} | {
        str(namesake), str(model)}
    assert reasons[str(model)] == f"{model}: named more than once among the inputs (first as {model}); packed once."
    assert reasons[str(namesake)] == (f"{namesake}: its entry AF-A7YWM6-F1-model_v4 has the name of an entry already "
                                      "packed (from another input); names must be unique, so it is left out.")
    assert "1 residue(s): a FoldComp record holds 2 to 65535" in reasons[str(single)]
    assert reasons[str(damaged)].startswith(f"{damaged}: ")
    missing = tmp_path / "missing.pdb"
    assert reasons[str(missing)] == f"{missing}: no such file or folder (line 5 of {listing})."
    assert out.strip() == f"packed 2 chain(s) from 5 input(s) into {db}; 5 left out, listed in {db}.skipped.tsv"


# ---- the official layout ---------------------------------------------------------------------------------------
def test_a_database_laid_out_by_hand_reads_the_same(packed_real, tmp_path):
    """The published layout written with plain Python (records each followed by NUL; `.index` key TAB offset TAB
    size; `.lookup` key TAB name TAB 0; `.dbtype` int32 12 little-endian) from the records of pack's database: the
    same bytes as pack's files, and the same proteins read back."""
    from esm_gearnet.data.io.foldcomp import Database

    db, _ = packed_real
    packed = Database(db)
    records = [(packed.name(i), packed.record(i)) for i in range(len(packed))]
    hand = tmp_path / "hand"
    data, index, lookup, offset = b"", "", "", 0
    for key, (name, record) in enumerate(records):
        data += record + b"\0"
        index += f"{key}\t{offset}\t{len(record) + 1}\n"
        lookup += f"{key}\t{name}\t0\n"
        offset += len(record) + 1
    hand.write_bytes(data)
    Path(f"{hand}.index").write_text(index)
    Path(f"{hand}.lookup").write_text(lookup)
    Path(f"{hand}.dbtype").write_bytes(struct.pack("<i", 12))
    for suffix in DB_FILES[:4]:
        assert Path(f"{hand}{suffix}").read_bytes() == Path(f"{db}{suffix}").read_bytes(), suffix
    ours, theirs = read_back(db), read_back(hand)
    assert list(ours) == list(theirs)
    for name in ours:
        for field in ("residue_type", "atom_pos", "atom_mask", "residue_number", "bfactor"):
            assert (getattr(ours[name], field) == getattr(theirs[name], field)).all(), (name, field)


# ---- AlphaFold DB tars -----------------------------------------------------------------------------------------
def test_an_alphafold_tar_is_packed_member_by_member(tmp_path, monkeypatch):
    from esm_gearnet.data import load_structure

    archive = af_tar(tmp_path / "UP000000000_1_TEST_v4.tar")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # a member extracted to the working folder would show here
    out_dir = tmp_path / "out"
    code, out, err = pack(archive, "-o", out_dir / "afdb")
    assert code == 0, err
    models = sorted(ALPHAFOLD.glob("*.pdb"))
    entries = read_back(out_dir / "afdb")
    assert list(entries) == [m.name[:-len(".pdb")] for m in models]  # AlphaFold DB's names, the .pdb.gz read
    for model in models:
        reference = load_structure(model)
        protein = entries[model.name[:-len(".pdb")]]
        assert protein.sequence == reference.sequence and ca_error(protein, reference) < 0.5
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(
        [".afdb.lock"] + [f"afdb{suffix}" for suffix in DB_FILES])  # the database and its lock: nothing extracted
    assert list(work.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == [archive.name, "out", "work"]
    assert out.strip() == f"packed 3 chain(s) from 3 input(s) into {out_dir / 'afdb'}; none left out"


def test_the_cif_member_is_read_when_there_is_no_pdb(tmp_path):
    from esm_gearnet.data.archives import structure_members

    archive = tmp_path / "only_cif.tar"
    with tarfile.open(archive, "w") as tar:
        for name in ("a/AF-X-F1-model_v4.cif.gz", "a/AF-Y-F1-model_v4.pdb.gz", "a/AF-Y-F1-model_v4.cif.gz",
                     "a/AF-X-F1-confidence_v4.json.gz"):
            info = tarfile.TarInfo(name)
            tar.addfile(info, io.BytesIO(b""))
    assert structure_members(archive) == ["a/AF-X-F1-model_v4.cif.gz", "a/AF-Y-F1-model_v4.pdb.gz"]
    damaged = tmp_path / "damaged.tar"  # cut inside its first member's data
    with tarfile.open(damaged, "w") as tar:
        for name in ("AF-X-F1-model_v4.pdb.gz", "AF-Y-F1-model_v4.pdb.gz"):
            info = tarfile.TarInfo(name)
            info.size = 2000
            tar.addfile(info, io.BytesIO(bytes(2000)))
    damaged.write_bytes(damaged.read_bytes()[:1500])
    from esm_gearnet.data.archives import ArchiveError

    with pytest.raises(ArchiveError, match=f"^{damaged}: the archive cannot be read"):
        structure_members(damaged)


# ---- killed and continued --------------------------------------------------------------------------------------
# `python -c KILL_AFTER_ENTRIES N script/pack.py ARGS...`: script/pack.py run as `python script/pack.py ARGS...`,
# except that batches hold 2 structures a worker and the process SIGKILLs itself once the writer has journaled
# its Nth entry: the same place in every run (the conftest's KILL_BEFORE_CHECKPOINT pattern; nothing in
# esm_gearnet knows about it).
KILL_AFTER_ENTRIES = """
import os, runpy, signal, sys
from esm_gearnet.commands import pack
from esm_gearnet.data.io.foldcomp import DatabaseWriter

entries, sys.argv = int(sys.argv[1]), sys.argv[2:]
pack.BATCH = 2
append = DatabaseWriter.append

def append_or_die(self, name, record, source="-"):
    append(self, name, record, source)
    if len(self) == entries:
        os.kill(os.getpid(), signal.SIGKILL)

DatabaseWriter.append = append_or_die
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_a_killed_pack_continues_to_the_database_of_an_uninterrupted_one(tmp_path):
    names = ["1BC8-C.pdb", "1D66-A.pdb", "5YH2-A.pdb", "1FQT-A.pdb", "1GN0-A.pdb", "103L-A.pdb", "6MRR-A.pdb",
             "1A7G-E.cif"]
    listing = tmp_path / "inputs.txt"
    listing.write_text("".join(f"{_require(STRUCTURES) / n}\n" for n in names))
    archive = af_tar(tmp_path / "proteome.tar")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def command(db, *prefix):
        return [sys.executable, *prefix, str(ROOT / "script" / "pack.py"), str(listing), str(archive), "-o", str(db),
                "--workers", "1", "--quiet"]

    whole = run_command(command(tmp_path / "whole" / "db"), 300, env=env)
    assert whole.returncode == 0, whole.stderr
    # 2 structures a batch: [1BC8-C 1D66-A] [5YH2-A (left out) 1FQT-A] [1GN0-A 103L-A (left out)] are marked done;
    # [6MRR-A 1A7G-E], entries 5 and 6, are journaled when the kill comes, not done: cut, and packed again
    killed = run_command(command(tmp_path / "killed" / "db", "-c", KILL_AFTER_ENTRIES, "6"), 300, env=env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    partial = tmp_path / "killed" / "db.partial.tsv"
    journal = partial.read_text()
    assert journal.count("done\t") == 6 and journal.count("left\t") == 2 and "\t6MRR-A\t" in journal
    assert not Path(tmp_path / "killed" / "db.index").exists()
    resumed = run_command(command(tmp_path / "killed" / "db"), 300, env=env)
    assert resumed.returncode == 0, resumed.stderr
    for suffix in DB_FILES + (".skipped.tsv",):
        killed_file, whole_file = (tmp_path / run / f"db{suffix}" for run in ("killed", "whole"))
        assert killed_file.read_bytes() == whole_file.read_bytes(), suffix
    assert not partial.exists() and not Path(f"{tmp_path}/killed/db.partial").exists()
    assert resumed.stdout == whole.stdout.replace("/whole/", "/killed/")
    assert "left out" in whole.stdout and len(skipped_rows(tmp_path / "whole" / "db")) == 2


def test_a_writer_killed_inside_close_continues(tmp_path, monkeypatch):
    """Killed after the data file was renamed to DB and before DB.index was written: the next writer moves the
    data back and continues with every entry."""
    from esm_gearnet import writing
    from esm_gearnet.data.io.foldcomp import Database, DatabaseWriter

    records = _records(3)
    writer = DatabaseWriter(tmp_path / "db", "settings one")
    for name, record in records:
        writer.append(name, record, name)
    writer.leave_out("bad.pdb", "bad.pdb: a reason.", "bad.pdb")
    writer.done(*[name for name, _ in records], "bad.pdb")
    write = writing.write_atomic

    def killed_at_the_index(path, content):
        if str(path).endswith(".index"):
            raise KeyboardInterrupt  # stands for the kill
        write(path, content)

    monkeypatch.setattr(writing, "write_atomic", killed_at_the_index)
    with pytest.raises(KeyboardInterrupt):
        writer.close()
    monkeypatch.setattr(writing, "write_atomic", write)
    assert (tmp_path / "db").exists() and not (tmp_path / "db.index").exists()
    with pytest.raises(ValueError, match="was begun with other settings"):
        DatabaseWriter(tmp_path / "db", "settings two")
    again = DatabaseWriter(tmp_path / "db", "settings one")
    assert list(again.sources_done) == [name for name, _ in records] + ["bad.pdb"]
    assert again.left_out == [("bad.pdb", "bad.pdb: a reason.")]
    again.close()
    database = Database(tmp_path / "db")
    assert [database.name(i) for i in range(len(database))] == [name for name, _ in records]
    assert [database.record(i) for i in range(3)] == [record for _, record in records]


def test_a_journal_is_trusted_only_as_far_as_the_data_reached_the_disk(tmp_path):
    """Entries whose bytes are not (all) in DB.partial, and every line after them, are dropped: the inputs marked
    done after them are packed again; a torn last line is dropped too."""
    from esm_gearnet.data.io.foldcomp import Database, DatabaseWriter

    records = _records(3)
    writer = DatabaseWriter(tmp_path / "db")
    writer.append(*records[0], "a")
    writer.done("a")
    writer.append(*records[1], "b")
    writer.append(*records[2], "b")
    writer.done("b")
    writer.abandon()
    journal = tmp_path / "db.partial.tsv"
    with open(journal, "a") as handle:
        handle.write("done\tc")  # torn: no line break
    again = DatabaseWriter(tmp_path / "db")
    assert list(again.sources_done) == ["a", "b"] and len(again) == 3
    again.abandon()
    with open(tmp_path / "db.partial", "r+b") as handle:  # the last entry's bytes never reached the disk
        handle.truncate(len(records[0][1]) + len(records[1][1]) + 2 + 10)
    again = DatabaseWriter(tmp_path / "db")
    assert list(again.sources_done) == ["a"] and len(again) == 1
    assert (tmp_path / "db.partial").stat().st_size == len(records[0][1]) + 1
    again.append(*records[1], "b")
    again.append(*records[2], "b")
    again.done("b")
    again.close()
    database = Database(tmp_path / "db")
    assert [database.record(i) for i in range(3)] == [record for _, record in records]


# ---- damaged databases -----------------------------------------------------------------------------------------
def _records(count):
    """(name, FoldComp record) of the first `count` AlphaFold models' chains."""
    from esm_gearnet.data.io import read_structure_arrays
    from esm_gearnet.data.io.foldcomp import encode

    records = []
    for model in sorted(_require(ALPHAFOLD).glob("*.pdb"))[:count]:
        arrays, meta = read_structure_arrays(model)
        records.append((meta["name"], encode(arrays, np.arange(len(arrays["residue_type"])), "A", meta["name"])))
    return records


@pytest.fixture
def small_db(tmp_path):
    from esm_gearnet.data.io.foldcomp import write_database

    return write_database(tmp_path / "small", _records(3))


def _entry_error(db, position):
    from esm_gearnet.data.io import EntryError
    from esm_gearnet.data.io.foldcomp import Database

    database = Database(db)
    with pytest.raises(EntryError) as caught:
        database.arrays(position)
    return database, str(caught.value)


def _good(database, positions):
    for i in positions:
        arrays, meta = database.arrays(i)
        assert len(arrays["residue_type"]) > 1 and meta["name"] == database.name(i)


def test_an_index_offset_past_the_data(small_db):
    index = Path(f"{small_db}.index")
    rows = [line.split("\t") for line in index.read_text().splitlines()]
    rows[1][1] = str(small_db.stat().st_size + 10)
    index.write_text("".join("\t".join(row) + "\n" for row in rows))
    database, message = _entry_error(small_db, 1)
    assert message == (f"FoldComp database {small_db}, entry AF-A0A2Z5TJB0-F1-model_v4 (key 1): its offset and size "
                       "run past the end of the data file (a truncated or damaged file).")
    _good(database, [0, 2])


def test_a_truncated_data_file(small_db):
    sizes = [int(line.split("\t")[2]) for line in Path(f"{small_db}.index").read_text().splitlines()]
    with open(small_db, "r+b") as handle:
        handle.truncate(sizes[0] + sizes[1] + 5)
    database, message = _entry_error(small_db, 2)
    assert message.startswith(f"FoldComp database {small_db}, entry AF-A7YWM6-F1-model_v4 (key 2): its offset")
    _good(database, [0, 1])


def test_a_lookup_missing_a_key(small_db):
    lookup = Path(f"{small_db}.lookup")
    lookup.write_text("".join(line + "\n" for line in lookup.read_text().splitlines() if not line.startswith("0\t")))
    database, message = _entry_error(small_db, 0)
    assert message == (f"FoldComp database {small_db}, entry 0 (key 0): it has no name in the lookup file (the "
                       "lookup disagrees with the index).")
    _good(database, [1, 2])


def test_a_record_that_is_not_foldcomp(small_db):
    offset = int(Path(f"{small_db}.index").read_text().splitlines()[1].split("\t")[1])
    with open(small_db, "r+b") as handle:
        handle.seek(offset)
        handle.write(b"PDB!")
    database, message = _entry_error(small_db, 1)
    assert message == (f"FoldComp database {small_db}, entry AF-A0A2Z5TJB0-F1-model_v4 (key 1): the bytes at offset "
                       f"{offset} are not a FoldComp record (no FCMP at its start or no NUL at its end: the index "
                       "does not match the data file).")
    _good(database, [0, 2])


def test_a_missing_index(small_db):
    from esm_gearnet.data.io.foldcomp import Database

    Path(f"{small_db}.index").unlink()
    with pytest.raises(FileNotFoundError, match=f"^FoldComp database {small_db}: small.index missing"):
        Database(small_db)


def test_a_record_of_one_residue_is_refused_not_decoded():
    """foldcomp's decoder crashes (SIGSEGV) on a record of one residue: `decode` refuses it from its header."""
    import foldcomp

    from esm_gearnet.data.io import EntryError
    from esm_gearnet.data.io.foldcomp import decode

    lines = (_require(ALPHAFOLD) / "AF-A7YWM6-F1-model_v4.pdb").read_text().splitlines()
    record = foldcomp.compress("one", "\n".join(l for l in lines if l.startswith("ATOM") and l[22:26] == "   1"))
    with pytest.raises(EntryError, match="^somewhere: its header counts 1 residue"):
        decode(record, "somewhere", "one")


# ---- the command's refusals ------------------------------------------------------------------------------------
def test_refusals_say_one_sentence_and_write_nothing(tmp_path, packed_real):
    model = _require(ALPHAFOLD) / "AF-A7YWM6-F1-model_v4.pdb"
    empty_list = tmp_path / "empty.txt"
    empty_list.write_text("")
    no_structures = tmp_path / "folder"
    no_structures.mkdir()
    (no_structures / "README.md").write_text("no structures here")
    other = tmp_path / "other.txt"
    other.write_text("a file of the user's")
    db, _ = packed_real
    out = tmp_path / "out"
    cases = [
        ((tmp_path / "missing.pdb", model), out, f"error: {tmp_path / 'missing.pdb'}: no such file or folder; it "
                                                "names nothing to pack, and nothing was written."),
        ((model, empty_list), out, f"error: {empty_list}: not a structure file (.pdb, .ent, .cif, .mmcif, .gz too) "
                                   "and not a list of paths: it is empty; it names nothing to pack, and nothing was "
                                   "written."),
        ((no_structures,), out, f"error: {no_structures}: a folder with no structure files (.pdb, .ent, .cif, .mmcif, "
                                ".gz too) or .tar archives in it; it names nothing to pack, and nothing was written."),
        ((model,), db, f"error: {db} exists (a complete FoldComp database); choose another -o or remove it (real, "
                       "real.index, real.lookup, real.dbtype)."),
        ((model,), other, f"error: {other} exists; choose another -o or remove it."),
        ((model,), tmp_path, f"error: -o {tmp_path} is a folder; name the database to write, e.g. "
                             f"{tmp_path / 'structures'}."),
    ]
    for inputs, output, sentence in cases:
        before = sorted(tmp_path.rglob("*"))
        code, stdout, stderr = pack(*inputs, "-o", output)
        assert (code, stderr.strip()) == (2, sentence)
        assert stdout == "" and sorted(tmp_path.rglob("*")) == before
    code, _, stderr = pack(model, "-o", out, "--max-ca-error", "0")
    assert (code, stderr.strip()) == (2, "error: --max-ca-error 0: give a distance in Å above 0.")
    code, _, stderr = pack(model, "-o", out, "--workers", "0")
    assert (code, stderr.strip()) == (2, "error: --workers 0: give at least 1 (packing runs in worker processes).")
    assert not any(Path(f"{out}{suffix}").exists() for suffix in DB_FILES)


def test_a_partial_database_is_continued_only_with_the_same_options(tmp_path):
    from esm_gearnet.data.io.foldcomp import DatabaseWriter

    model = _require(ALPHAFOLD) / "AF-A7YWM6-F1-model_v4.pdb"
    DatabaseWriter(tmp_path / "db", "max_ca_error=1.0 split_breaks=False").abandon()
    code, _, stderr = pack(model, "-o", tmp_path / "db", "--max-ca-error", "2")
    assert code == 2 and stderr.startswith(f"error: {tmp_path / 'db.partial'} was begun with other settings "
                                           "(max_ca_error=1.0 split_breaks=False) than these (max_ca_error=2.0 "
                                           "split_breaks=False)")
    code, out, stderr = pack(model, "-o", tmp_path / "db")
    assert code == 0, stderr
    assert out.strip() == f"packed 1 chain(s) from 1 input(s) into {tmp_path / 'db'}; none left out"


def test_help():
    code, out, _ = pack("--help")
    assert code == 0 and out.startswith("usage: esm-gearnet pack ") and "--max-ca-error" in out
