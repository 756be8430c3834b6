"""ATOM3D LMDBs: ATOM3D's own test LMDBs read exactly, PSR and MSP written from real structures in the format and
read back (labels, target ids, mutations), TruncateProteinPair, AlphaFoldDB proteome splits."""
import shutil
import tarfile

import pytest
import torch

from conftest import ALPHAFOLD, PSR_TARGETS, SHARED_DATA, STRUCTURES, write_msp, write_psr
from esm_gearnet.data import collate, load_structure
from esm_gearnet.data.datasets import AlphaFoldDB, LMDBFile, MSPDataset, PSRDataset, write_lmdb
from esm_gearnet.data.datasets.atom3d import atoms_to_protein
from esm_gearnet.data.transforms import TruncateProteinPair

ATOM3D = SHARED_DATA / "atom3d"


@pytest.fixture(autouse=True)
def _needs_shared_data():
    if not STRUCTURES.exists():
        pytest.skip("../shared/data is absent: these tests read the real structures")


@pytest.mark.parametrize("folder", ["tests_test_data_lmdb", "tests_test_data_lmdb_old", "atom3d_data_test_lmdb"])
def test_atom3d_own_lmdbs_give_the_proteins_of_the_pdb_files(folder):
    lmdb = LMDBFile(ATOM3D / folder)
    assert len(lmdb) == 4 and lmdb.ids == ["11as.pdb", "117e.pdb", "2olx.pdb", "103l.pdb"]
    for index, reference, chain in [(3, "103L-A.pdb", "A"), (0, "11AS-A.pdb", "A")]:
        item = lmdb[index]
        assert len(item["atoms"]["data"]) == {3: 1404, 0: 5220}[index]
        protein = atoms_to_protein(item["atoms"], item["id"])
        protein = protein.subresidue(torch.tensor([c == chain for c in protein.chain]))
        expected = load_structure(STRUCTURES / reference)
        assert protein.sequence == expected.sequence  # the free ASN ligand of 11as (HETATM) is not a residue
        assert torch.equal(protein.residue_number, expected.residue_number)
        assert torch.equal(protein.atom_mask, expected.atom_mask)
        assert torch.allclose(protein.atom_pos, expected.atom_pos, atol=1e-5)
        assert torch.allclose(protein.bfactor, expected.bfactor)
    if folder == "atom3d_data_test_lmdb":
        assert lmdb[0]["label"] == 0


def test_psr_written_from_real_structures_reads_back(tmp_path):
    scores = write_psr(tmp_path)
    dataset = PSRDataset(tmp_path, workers=2, progress=False)
    assert dataset.tasks == ["gdt_ts"] and dataset.num_samples == [4, 2, 2]
    assert len(dataset.skipped) == 1 and "no amino-acid residue" in dataset.skipped[0][1]
    report = tmp_path / "PSR-split-by-year" / "PSR-split-by-year.cache.pt.skipped.tsv"
    assert "train" in report.read_text()
    seen = set()
    for split, indices in zip(("train", "val", "test"), dataset.split_indices):
        for i in indices:
            item = dataset[i]
            key = (item["target_id"], item["decoy"])
            seen.add(key)
            assert item["targets"].item() == pytest.approx(scores[key])
            reference = load_structure(STRUCTURES / PSR_TARGETS[item["target_id"]])
            assert item["graph"].sequence == reference.sequence
            error = (item["graph"].atom_pos - reference.atom_pos)[reference.atom_mask].norm(dim=-1)
            if item["decoy"] == "server00_TS1":
                assert error.max() < 1e-5
            else:
                assert error.mean() > 0.1  # the decoys are the noisy copies
    assert seen == set(scores)
    batch = collate([dataset[i] for i in dataset.split_indices[0]])
    assert batch["target_id"] == ["T0950", "T0950", "T0951", "T0951"]
    again = PSRDataset(tmp_path, progress=False)  # from the cache
    assert torch.equal(again.targets, dataset.targets) and again.target_ids == dataset.target_ids
    assert torch.equal(again[5]["graph"].atom_pos, dataset[5]["graph"].atom_pos)


def test_msp_written_from_real_structures_reads_back(tmp_path):
    expected = write_msp(tmp_path)
    dataset = MSPDataset(tmp_path, progress=False)
    assert dataset.tasks == ["label"] and dataset.num_samples == [2, 1, 1] and not dataset.skipped
    for i in range(len(dataset)):
        item = dataset[i]
        label, site = expected[dataset.ids[i]]
        assert item["targets"].tolist() == [float(label)]
        wild, mutant = item["graph1"], item["graph2"]
        differ = (wild.residue_type != mutant.residue_type).nonzero().flatten().tolist()
        assert differ == [site]
        assert item["mutation"] == dataset.ids[i].split("_")[-1]
        assert item["mutation"][-1] == mutant.sequence[site] and item["mutation"][0] == wild.sequence[site]
        assert int(item["mutation"][2:-1]) == int(wild.residue_number[site])
        assert mutant.atom_mask[site, 5:].sum() == mutant.atom_mask[site].sum() - 5  # side chain beyond CB gone
        assert torch.equal(wild.atom_pos[:site], mutant.atom_pos[:site])


def test_truncate_protein_pair_keeps_the_mutation_in_the_window(tmp_path):
    write_msp(tmp_path)
    item = MSPDataset(tmp_path, progress=False)[3]  # 2N2U mutated at residue index 40 of 67
    site = 40
    centred = TruncateProteinPair(max_length=20)(item)
    assert centred["graph1"].num_residue == centred["graph2"].num_residue == 20
    kept = centred["graph1"].residue_number.tolist()
    assert kept == item["graph1"].residue_number[30:50].tolist()
    assert centred["graph1"].residue_type[10] != centred["graph2"].residue_type[10]
    assert centred["targets"] is item["targets"] and item["graph1"].num_residue == 67  # input unchanged
    at_end = TruncateProteinPair(max_length=60)(item)  # the centred window would pass the end: moved inwards
    assert at_end["graph1"].residue_number.tolist() == item["graph1"].residue_number[7:67].tolist()
    torch.manual_seed(0)
    starts = set()
    for _ in range(300):
        window = TruncateProteinPair(max_length=20, random=True)(item)
        start = item["graph1"].residue_number.tolist().index(int(window["graph1"].residue_number[0]))
        assert start <= site < start + 20
        assert (window["graph1"].residue_type != window["graph2"].residue_type).sum() == 1
        starts.add(start)
    assert starts == set(range(site - 19, site + 1))  # every window holding the mutation is drawn
    assert TruncateProteinPair(max_length=100)(item) is item


def test_lmdb_reader_refuses_pickles_and_reads_msgpack(tmp_path):
    frame = {"columns": ["model"], "index": [0], "data": [[1]]}
    write_lmdb(tmp_path / "mp", [{"id": "a", "atoms": frame, "label": "1"}], serialization_format="msgpack")
    item = LMDBFile(tmp_path / "mp")[0]
    assert item["label"] == "1" and item["atoms"] == frame
    assert item["types"]["atoms"] == "<class 'pandas.core.frame.DataFrame'>"
    import lmdb
    env = lmdb.open(str(tmp_path / "pk"))
    with env.begin(write=True) as txn:
        txn.put(b"num_examples", b"1")
        txn.put(b"serialization_format", b"pkl")
    env.close()
    with pytest.raises(ValueError, match="pickled"):
        LMDBFile(tmp_path / "pk")
    with pytest.raises(FileNotFoundError, match="data.mdb"):
        LMDBFile(tmp_path / "nothing")


def test_alphafold_db_splits_a_proteome_archive(tmp_path, monkeypatch):
    models = sorted(ALPHAFOLD.glob("*.pdb"))
    archive = tmp_path / "UP000005640_9606_HUMAN_v4.tar"
    with tarfile.open(archive, "w") as handle:
        for k, model in enumerate(models * 2):  # six proteins, named as in the real archives
            gz = tmp_path / f"AF-P{k:05d}-F1-model_v4.pdb.gz"
            import gzip
            gz.write_bytes(gzip.compress(model.read_bytes()))
            handle.add(gz, arcname=gz.name)
            handle.add(model, arcname=f"AF-P{k:05d}-F1-model_v4.cif.gz")  # the mmCIF twins are left in the tar
            gz.unlink()
    monkeypatch.setattr(AlphaFoldDB, "split_length", 4)
    first = AlphaFoldDB(tmp_path, species_id=8, split_id=0, progress=False)
    second = AlphaFoldDB(tmp_path, species_id=8, split_id=1, progress=False)
    assert first.num_splits == 2 and len(first) == 4 and len(second) == 2
    assert first.num_samples == [4, 0, 0]
    assert [p.split("/")[-1] for p in second.proteins.files] == ["AF-P00004-F1-model_v4.pdb.gz",
                                                                 "AF-P00005-F1-model_v4.pdb.gz"]
    assert not list((tmp_path / "UP000005640_9606_HUMAN_v4").glob("*.cif.gz"))  # only the split's files
    reference = load_structure(models[1])
    protein = first[1]["graph"]
    assert protein.sequence == reference.sequence
    assert torch.equal(protein.bfactor, reference.bfactor) and protein.bfactor.max() <= 100  # pLDDT kept
    with pytest.raises(ValueError, match="split_id must be below 2"):
        AlphaFoldDB(tmp_path, species_id=8, split_id=2, progress=False)
    with pytest.raises(ValueError, match="species_id"):
        AlphaFoldDB(tmp_path, species_id=99)
    shutil.rmtree(tmp_path / "UP000005640_9606_HUMAN_v4")
    assert len(AlphaFoldDB(tmp_path, species_id=8, split_id=0, progress=False)) == 4  # re-extracted from the tar


# ---- one atom -> residue reader: an ATOM3D item reads as the same atoms in a PDB file --------------------------
def _rounded(frame):
    """The table with coordinates, occupancies and B-factors at the precision a PDB file holds."""
    c = {name: i for i, name in enumerate(frame["columns"])}
    rows = [list(row) for row in frame["data"]]
    for row in rows:
        for key, digits in (("x", 3), ("y", 3), ("z", 3), ("occupancy", 2), ("bfactor", 2)):
            row[c[key]] = round(float(row[c[key]]), digits)
    return {**frame, "data": rows}


def _write_pdb(frame, path):
    """The table's first model as PDB records: HETATM for hetero rows, a TER after the last ATOM row of each
    chain (later models, which both readers ignore, are left out)."""
    c = {name: i for i, name in enumerate(frame["columns"])}
    rows = [row for row in frame["data"] if row[c["model"]] == frame["data"][0][c["model"]]]
    last_atom = {}
    for i, row in enumerate(rows):
        if not str(row[c["hetero"]]).strip():
            last_atom[row[c["chain"]]] = i
    lines = []
    for i, row in enumerate(rows):
        record = "ATOM" if not str(row[c["hetero"]]).strip() else "HETATM"
        fullname = row[c["fullname"]] if len(row[c["name"]]) < 4 else row[c["name"]]
        lines.append(f"{record:<6}{i + 1:>5} {fullname:<4}{row[c['altloc']]:1}{row[c['resname']]:>3} "
                     f"{row[c['chain']]:1}{row[c['residue']]:>4}{row[c['insertion_code']]:1}   "
                     f"{row[c['x']]:8.3f}{row[c['y']]:8.3f}{row[c['z']]:8.3f}{row[c['occupancy']]:6.2f}"
                     f"{row[c['bfactor']]:6.2f}      {row[c['segid']]:<4}{row[c['element']]:>2}")
        if last_atom.get(row[c["chain"]]) == i:
            lines.append("TER")
    path.write_text("\n".join(lines + ["END", ""]))
    return path


def _assert_equal_proteins(ours, theirs):
    for field in ("residue_type", "atom_pos", "atom_mask", "residue_number", "insertion_code", "chain_index",
                  "bfactor"):
        assert torch.equal(getattr(ours, field), getattr(theirs, field)), field
    assert ours.chain_ids == theirs.chain_ids and ours.num_dropped == theirs.num_dropped


def _tables():
    for folder in ("tests_test_data_lmdb", "atom3d_data_test_lmdb"):
        lmdb = LMDBFile(ATOM3D / folder)
        for index in range(len(lmdb)):
            yield f"{folder}[{index}]", lmdb[index]["atoms"]


def test_an_atom3d_item_and_its_atoms_as_a_pdb_file_give_equal_proteins(tmp_path):
    """Every chain, ligand (the free ASN of 11as, waters, ions), residue number and atom of ATOM3D's own items."""
    for k, (name, frame) in enumerate(_tables()):
        frame = _rounded(frame)
        _assert_equal_proteins(atoms_to_protein(frame, name), load_structure(_write_pdb(frame, tmp_path / f"{k}.pdb")))


def _with_altlocs(frame, residue_number, occupancies):
    """The table with the side-chain atoms beyond CB of one residue of chain A doubled into altlocs A and B of
    the given occupancies, B's atoms moved by 1 Å in x."""
    c = {name: i for i, name in enumerate(frame["columns"])}
    rows = []
    for row in frame["data"]:
        if row[c["chain"]] == "A" and row[c["residue"]] == residue_number \
                and row[c["name"]] not in ("N", "CA", "C", "O", "CB"):
            first, second = list(row), list(row)
            first[c["altloc"]], first[c["occupancy"]] = "A", occupancies[0]
            second[c["altloc"]], second[c["occupancy"]] = "B", occupancies[1]
            second[c["x"]] = round(second[c["x"]] + 1.0, 3)
            rows += [first, second]
        else:
            rows.append(row)
    return {**frame, "data": rows}


@pytest.mark.parametrize("occupancies, moved", [((0.4, 0.6), True), ((0.6, 0.4), False), ((0.5, 0.5), False)])
def test_the_altloc_of_highest_occupancy_wins_as_in_a_pdb_file(tmp_path, occupancies, moved):
    frame = _rounded(LMDBFile(ATOM3D / "tests_test_data_lmdb")[3]["atoms"])  # 103l: lysozyme, chain A
    plain = atoms_to_protein(frame, "103l")
    planted = _with_altlocs(frame, 10, occupancies)
    ours = atoms_to_protein(planted, "103l")
    _assert_equal_proteins(ours, load_structure(_write_pdb(planted, tmp_path / "103l.pdb")))
    site = int((plain.residue_number == 10).nonzero()[0])
    side_chain = plain.atom_mask[site].clone()
    side_chain[:5] = False
    assert side_chain.any()
    shift = ours.atom_pos[site, side_chain, 0] - plain.atom_pos[site, side_chain, 0]
    assert torch.allclose(shift, torch.full_like(shift, 1.0 if moved else 0.0), atol=1e-4)


def _with_repeated_atom(frame):
    c = {name: i for i, name in enumerate(frame["columns"])}
    rows = list(frame["data"])
    at = next(i for i, row in enumerate(rows) if row[c["name"]] == "CB")
    return {**frame, "data": rows[:at + 1] + [list(rows[at])] + rows[at + 1:]}


def test_a_repeated_atom_is_refused_as_in_a_pdb_file_and_its_item_skipped(tmp_path):
    from esm_gearnet.data import StructureError

    frame = _rounded(LMDBFile(ATOM3D / "tests_test_data_lmdb")[3]["atoms"])
    bad = _with_repeated_atom(frame)
    with pytest.raises(StructureError, match="repeats the atom of") as ours:
        atoms_to_protein(bad, "103l")
    with pytest.raises(StructureError, match="repeats the atom of") as theirs:
        load_structure(_write_pdb(bad, tmp_path / "103l.pdb"))
    rest = lambda error: str(error.value).split("repeats", 1)[1]  # noqa: E731 - after "row N" / "line N"
    assert rest(ours).split(" of ", 1)[1].split()[0] in ("row", "line") and "remove one of the two" in rest(theirs)
    base = tmp_path / "PSR-split-by-year" / "split-by-year" / "data"
    good = {"atoms": frame, "scores": {"gdt_ts": 0.5}}
    write_lmdb(base / "train", [{**good, "id": str(("T1", "a"))}, {"id": str(("T1", "b")), "atoms": bad,
                                                                   "scores": {"gdt_ts": 0.4}}])
    for split in ("val", "test"):
        write_lmdb(base / split, [{**good, "id": str(("T2", split))}])
    dataset = PSRDataset(tmp_path, workers=1, progress=False)
    assert dataset.num_samples == [1, 1, 1]
    assert len(dataset.skipped) == 1 and "repeats the atom of" in dataset.skipped[0][1]
