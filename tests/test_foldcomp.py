"""`FoldCompDB`: entries decoded like `load_structure` reads the files they were made from, subsets by key and
name, one sentence for what cannot be used, a resumable download, and a run that stops when too many entries are
unreadable."""
import http.server
import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import ALPHAFOLD, _require
from esm_gearnet.data.datasets import FoldCompDB
from esm_gearnet.data.datasets.download import download
from esm_gearnet.data.io import load_structure
from esm_gearnet.data.io.foldcomp import Database, EntryError, write_database

ROOT = Path(__file__).resolve().parents[1]


def _alphafold():
    import foldcomp

    files = sorted(_require(ALPHAFOLD).glob("*.pdb"))
    return files, [(f.stem, foldcomp.compress(f.name, f.read_text())) for f in files]


@pytest.fixture(scope="module")
def database(tmp_path_factory):
    _, records = _alphafold()
    return write_database(tmp_path_factory.mktemp("db") / "afdb", records)


def test_entries_decode_to_what_load_structure_reads_from_the_models(database):
    """Sequence, residue numbers and pLDDT of AlphaFold models as in their files; coordinates within FoldComp's
    error (its torsion-angle compression: measured here at most 0.37 Å for Cα, 1.45 Å for any heavy atom)."""
    files, _ = _alphafold()
    dataset = FoldCompDB(database)
    assert len(dataset) == len(files)
    for i, path in enumerate(files):
        read, decoded = load_structure(path), dataset.protein(i)
        assert decoded.name == path.stem and decoded.chain_ids == ("A",)
        assert decoded.residue_type.tolist() == read.residue_type.tolist()
        assert decoded.residue_number.tolist() == read.residue_number.tolist()
        np.testing.assert_allclose(decoded.bfactor, read.bfactor, atol=0.2)  # pLDDT, stored in 8 bits
        assert (decoded.atom_mask == read.atom_mask).all()  # complete models: every atom14 slot as in the file
        assert float((decoded.pos - read.pos).norm(dim=-1).max()) < 0.5
        assert float((decoded.atom_pos - read.atom_pos)[read.atom_mask].norm(dim=-1).max()) < 1.5


def test_a_subset_by_keys_or_names_list_or_file(database, tmp_path):
    files, _ = _alphafold()
    by_key = FoldCompDB(database, ids=[2, 0])
    assert [by_key.name(i) for i in range(len(by_key))] == [files[0].stem, files[2].stem]  # database order
    listed = tmp_path / "names.txt"
    listed.write_text(f"{files[1].stem}\n\n{files[2].stem}\n")
    by_name = FoldCompDB(database, names=str(listed))
    assert [by_name.name(i) for i in range(len(by_name))] == [files[1].stem, files[2].stem]
    assert by_name.protein(0).name == files[1].stem


def test_what_cannot_be_used_is_one_sentence(database, tmp_path):
    with pytest.raises(ValueError, match=r"no entry named 'AF-NOPE'.*1 of the 2 names"):
        FoldCompDB(database, names=["AF-NOPE", _alphafold()[0][0].stem])
    with pytest.raises(ValueError, match="no entry with key 9"):
        FoldCompDB(database, ids=[9])
    with pytest.raises(ValueError, match="held_out: 3 must be"):
        FoldCompDB(database, held_out=3)
    with pytest.raises(FileNotFoundError, match=r"nothing: nothing, nothing.index, nothing.lookup, nothing.dbtype "
                                                r"missing"):
        FoldCompDB(tmp_path / "nothing")
    with pytest.raises(ValueError, match="names or ids|not both"):
        FoldCompDB(database, ids=[0], names=["x"])


def test_a_damaged_index_marks_its_entries_and_the_others_read(database, tmp_path):
    for suffix in ("", ".index", ".lookup", ".dbtype"):
        (tmp_path / f"db{suffix}").write_bytes(Path(f"{database}{suffix}").read_bytes())
    lines = (tmp_path / "db.index").read_text().splitlines()
    key, offset, size = lines[1].split("\t")
    lines[1] = f"{key}\t{10 ** 9}\t{size}"
    (tmp_path / "db.index").write_text("\n".join(lines) + "\n")
    db = Database(tmp_path / "db")
    assert db.entries.problem.tolist() == [0, 1, 0]
    with pytest.raises(EntryError, match=r"db, entry .* \(key 1\): its offset and size run past the end"):
        db.arrays(1)
    assert db.arrays(0)[1]["name"] and db.arrays(2)[1]["name"]
    (tmp_path / "db.index").write_text("0\t0\n")
    with pytest.raises(ValueError, match=r"db.index is not 3 numbers a line; the index is damaged"):
        Database(tmp_path / "db")


# ---- the download ---------------------------------------------------------------------------------------------
class _Ranged(http.server.SimpleHTTPRequestHandler):
    """Serves one file, honouring `Range: bytes=N-` as the FoldComp mirror does."""
    payload = b""

    def do_GET(self):
        start = 0
        if self.headers.get("Range"):
            start = int(self.headers["Range"].split("=")[1].rstrip("-"))
        body = self.payload[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_an_interrupted_download_continues_where_it_stopped(tmp_path):
    _Ranged.payload = bytes(range(256)) * 1000
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Ranged)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/afdb_rep_v4.index"
        (tmp_path / "afdb_rep_v4.index.part").write_bytes(_Ranged.payload[:100_000])  # what a kill left
        target = download(url, tmp_path, resume=True)
        assert target.read_bytes() == _Ranged.payload and not (tmp_path / "afdb_rep_v4.index.part").exists()
    finally:
        server.shutdown()


# ---- a run with too many unreadable entries --------------------------------------------------------------------
@pytest.mark.slow
def test_a_run_stops_in_one_sentence_when_too_many_entries_cannot_be_read(tmp_path, capsys):
    """120 entries, 20 of them truncated: the first are skipped and named in the log; past 1 % of the entries
    read (dataset.max_skipped), the run stops and says so (exit code 2)."""
    from esm_gearnet.commands.pretrain import main

    from esm_gearnet.data.datasets import DemoFolds
    from esm_gearnet.data.io.foldcomp import encode

    proteins = DemoFolds(num_protein=120, seed=3).proteins
    records = [(p.name, encode({k: v.numpy() for k, v in p.residue_fields().items()}, np.arange(p.num_residue),
                               "A", p.name)) for p in proteins]
    records = [(name, record[:60] if k % 6 == 0 else record) for k, (name, record) in enumerate(records)]
    database = write_database(tmp_path / "bad", records)
    code = main(["-c", str(ROOT / "config" / "demo" / "pretrain_foldcomp.yaml"), "--database", str(database),
                 "--engine.batch_size", "8", "--num_epoch", "1", "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert "more than the dataset's max_skipped (0.01) of the entries read could not be read (19 of 104" in err
    log = next((tmp_path / "out").rglob("log.txt")).read_text()
    assert "skipped entry demo_00000:" in log and "does not decode" in log
