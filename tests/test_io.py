"""Structure parsing on every real file, checked against an independent reading of the atom records."""
import gzip
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import List

import gemmi
import numpy as np
import pytest
import torch

from esm_gearnet.data import StructureError, constants, load_structure, load_structures
from esm_gearnet.data.io import (_TYPE_OF_RESIDUE, protein_name, read_structure_arrays, residue_arrays,
                                 residue_type_of, structure_format)
from conftest import structure_files

MODIFIED = {"MSE": "M", "TPO": "T", "SEP": "S", "PTR": "Y", "CSO": "C", "CME": "C", "MLY": "K", "HYP": "P"}


def _letter(resname):
    if resname in constants.THREE_TO_ONE:
        return constants.THREE_TO_ONE[resname]
    return MODIFIED.get(resname)


def _independent_residues(path):
    """Residues of the first model as (chain, number, icode) -> (letter, CA xyz of highest occupancy),
    read from the raw text: fixed PDB columns, or the mmCIF _atom_site table."""
    rows = []  # (record, chain, number, icode, resname, atom, altloc, occupancy, xyz, after_ter)
    if path.suffix == ".pdb":
        lines = path.read_text().splitlines()
        if any(line.startswith("ENDMDL") for line in lines):
            lines = lines[: next(i for i, line in enumerate(lines) if line.startswith("ENDMDL"))]
        # a hetero residue after the last TER of its chain is a ligand (TER may also mark chain breaks)
        last_ter = {line[21:22]: i for i, line in enumerate(lines) if line.startswith("TER")}
        for i, line in enumerate(lines):
            if line.startswith(("ATOM  ", "HETATM")):
                chain = line[21]
                rows.append((line[:6].strip(), chain, int(line[22:26]), line[26].strip(), line[17:20].strip(),
                             line[12:16].strip(), line[16].strip(), float(line[54:60]),
                             (float(line[30:38]), float(line[38:46]), float(line[46:54])),
                             i > last_ter.get(chain, len(lines))))
    else:
        block = gemmi.cif.read(str(path)).sole_block()
        table = block.find("_atom_site.", ["group_PDB", "auth_asym_id", "auth_seq_id", "pdbx_PDB_ins_code",
                                           "auth_comp_id", "auth_atom_id", "label_alt_id", "occupancy",
                                           "Cartn_x", "Cartn_y", "Cartn_z", "pdbx_PDB_model_num", "label_entity_id"])
        entity_type = dict(zip(block.find_loop("_entity.id"), block.find_loop("_entity.type")))
        first_model = table[0][11]
        for row in table:
            if row[11] != first_model:
                break
            icode = "" if row[3] in ("?", ".") else row[3]
            alt = "" if row[6] in ("?", ".") else row[6]
            rows.append((row[0], row[1], int(row[2]), icode, row[4], row[5].strip('"'), alt, float(row[7]),
                         (float(row[8]), float(row[9]), float(row[10])), entity_type.get(row[12]) != "polymer"))
    residues = OrderedDict()
    for record, chain, number, icode, resname, atom, alt, occ, xyz, ligand in rows:
        letter = _letter(resname)
        if letter is None or (record == "HETATM" and ligand):
            continue
        entry = residues.setdefault((chain, number, icode), {"ca": None})
        if atom == "CA" and (entry["ca"] is None or occ > entry["ca"][0]):
            entry["ca"] = (occ, xyz, letter)
    return OrderedDict((k, (v["ca"][2], v["ca"][1])) for k, v in residues.items() if v["ca"] is not None)


@pytest.mark.parametrize("path", structure_files(), ids=lambda p: p.name)
def test_real_structure_matches_independent_reading(path):
    protein = load_structure(path)
    reference = _independent_residues(path)
    assert protein.sequence == "".join(letter for letter, _ in reference.values())
    keys = list(reference)
    assert protein.residue_number.tolist() == [k[1] for k in keys]
    assert protein.insertion_codes == "".join(k[2] or " " for k in keys)
    assert protein.chain == [k[0] for k in keys]
    expected_ca = torch.tensor([xyz for _, xyz in reference.values()], dtype=torch.float32)
    torch.testing.assert_close(protein.pos, expected_ca, atol=1e-3, rtol=0)
    # every residue has its backbone CA; the layout puts N, CA, C, O first
    assert bool(protein.atom_mask[:, 1].all())
    assert protein.atom_pos.shape == (len(protein), 14, 3)
    assert bool((protein.atom_pos[~protein.atom_mask] == 0).all())


def test_selenomethionine_maps_to_methionine_with_its_selenium(structures_dir):
    protein = load_structure(structures_dir / "6A5K-A.cif")
    met = protein.residue_type == constants.LETTER_TO_TYPE["M"]
    sd = constants.ATOM_SLOTS[constants.LETTER_TO_TYPE["M"]]["SD"]
    assert int(met.sum()) >= 6  # six MSE in the file plus the real methionines
    assert bool(protein.atom_mask[met, sd].all())


def test_nmr_file_reads_its_first_model_only(structures_dir):
    protein = load_structure(structures_dir / "1TTV-A.pdb")
    st = gemmi.read_structure(str(structures_dir / "1TTV-A.pdb"))
    assert len(st) == 18
    first_ca = np.array([r["CA"][0].pos.tolist() for r in st[0][0] if r.get_ca() is not None])
    np.testing.assert_allclose(protein.pos.numpy(), first_ca, atol=1e-3)


def test_alphafold_plddt_is_kept_as_bfactor():
    path = next(p for p in structure_files() if p.name.startswith("AF-A7YWM6"))
    protein = load_structure(path)
    assert protein.num_residue == 153
    assert abs(float(protein.bfactor.mean()) - 91.71) < 0.01  # mean CA pLDDT stated in PROVENANCE.md


def _write_pdb(path, atoms):
    """atoms: (resname, chain, number, icode, name, altloc, occupancy, x, y, z)."""
    lines = []
    for serial, (resname, chain, number, icode, name, alt, occ, x, y, z) in enumerate(atoms, 1):
        lines.append(f"ATOM  {serial:5d} {name:<4s}{alt:1s}{resname:>3s} {chain:1s}{number:4d}{icode:1s}   "
                     f"{x:8.3f}{y:8.3f}{z:8.3f}{occ:6.2f}{20.0:6.2f}          {name[0]:>2s}")
    path.write_text("\n".join(lines) + "\nEND\n")
    return path


def _gly(chain, number, x, icode="", alt="", occ=1.0, resname="GLY"):
    return [(resname, chain, number, icode, n, alt, occ, x + dx, 0.0, 0.0)
            for n, dx in (("N", 0.0), ("CA", 1.0), ("C", 2.0), ("O", 3.0))]


def test_altloc_keeps_highest_occupancy_conformer(tmp_path):
    atoms = _gly("A", 1, 0.0)
    atoms += _gly("A", 2, 10.0, alt="A", occ=0.3) + _gly("A", 2, 20.0, alt="B", occ=0.7)
    atoms += _gly("A", 3, 30.0, alt="A", occ=0.5) + _gly("A", 3, 40.0, alt="B", occ=0.5)  # tie: first
    protein = load_structure(_write_pdb(tmp_path / "alt.pdb", atoms))
    assert protein.pos[:, 0].tolist() == [1.0, 21.0, 31.0]
    assert protein.atom_pos[1, :4, 0].tolist() == [20.0, 21.0, 22.0, 23.0]


def test_insertion_codes_chains_and_chain_filter(tmp_path):
    atoms = _gly("A", 10, 0.0) + _gly("A", 10, 5.0, icode="A") + _gly("A", 11, 10.0) + _gly("B", 1, 20.0)
    path = _write_pdb(tmp_path / "multi.pdb", atoms)
    protein = load_structure(path)
    assert protein.residue_number.tolist() == [10, 10, 11, 1]
    assert protein.insertion_codes == " A  "
    assert protein.chain_ids == ("A", "B") and protein.chain == ["A", "A", "A", "B"]
    only_b = load_structure(path, chain="B")
    assert only_b.num_residue == 1 and only_b.chain_ids == ("B",)
    with pytest.raises(StructureError, match="no chain 'C'.*chains: A, B"):
        load_structure(path, chain="C")


def test_residue_without_ca_is_dropped_and_counted(tmp_path):
    atoms = _gly("A", 1, 0.0) + [a for a in _gly("A", 2, 10.0) if a[4] != "CA"] + _gly("A", 3, 20.0)
    protein = load_structure(_write_pdb(tmp_path / "noca.pdb", atoms))
    assert protein.residue_number.tolist() == [1, 3]
    assert protein.num_dropped == 1


def test_gzip_and_mmcif_give_the_same_protein(tmp_path, structures_dir):
    source = structures_dir / "1A7G-E.cif"
    gz = tmp_path / "1A7G-E.cif.gz"
    with open(source, "rb") as fin, gzip.open(gz, "wb") as fout:
        shutil.copyfileobj(fin, fout)
    a, b = load_structure(source), load_structure(gz)
    assert a.sequence == b.sequence and b.name == "1A7G-E"
    assert torch.equal(a.atom_pos, b.atom_pos) and torch.equal(a.atom_mask, b.atom_mask)
    pdb_gz = tmp_path / "2N2U-A.pdb.gz"
    with open(structures_dir / "2N2U-A.pdb", "rb") as fin, gzip.open(pdb_gz, "wb") as fout:
        shutil.copyfileobj(fin, fout)
    assert torch.equal(load_structure(pdb_gz).atom_pos, load_structure(structures_dir / "2N2U-A.pdb").atom_pos)


def _bad_corpus(root, structures_dir):
    """At least 15 malformed inputs; returns their paths."""
    real_pdb = (structures_dir / "5YH2-A.pdb").read_bytes()
    real_cif = (structures_dir / "6A5K-A.cif").read_bytes()
    rng = np.random.default_rng(0)
    files = {
        "empty.pdb": b"",
        "empty.cif": b"",
        "plain_text.pdb": b"These are my notes about the protein, not a structure.\n",
        "binary.pdb": rng.bytes(4096),
        "binary.cif": rng.bytes(4096),
        "truncated_mid_record.pdb": real_pdb[: real_pdb.index(b"\nATOM", 20000) + 40],
        "truncated.cif": real_cif[:20000],
        "no_atom_site.cif": b"data_x\n_cell.length_a 10.0\n",
        "header_only.pdb": real_pdb[: real_pdb.index(b"\nATOM") + 1],
        "waters_only.pdb": b"".join(l + b"\n" for l in real_pdb.splitlines() if b"HOH" in l) or
                           b"HETATM    1  O   HOH A 301      1.000   2.000   3.000  1.00 20.00           O\n",
        "ligand_only.pdb": b"".join(l + b"\n" for l in real_pdb.splitlines() if l.startswith(b"HETATM")),
        "dna_only.pdb": b"ATOM      1  P    DA B   1      1.000   2.000   3.000  1.00 20.00           P\n"
                        b"ATOM      2  C1'  DA B   1      2.000   2.000   3.000  1.00 20.00           C\n",
        "no_ca_atoms.pdb": b"".join(l + b"\n" for l in real_pdb.splitlines()
                                    if l.startswith(b"ATOM") and l[12:16].strip() != b"CA"),
        "nan_coordinates.pdb": b"ATOM      1  CA  GLY A   1      1.000     nan   3.000  1.00 20.00           C\n",
        "structure.xyz": b"3\nwater\nO 0 0 0\nH 1 0 0\nH 0 1 0\n",
        "model.pdb.txt": real_pdb,
    }
    paths = []
    for name, data in files.items():
        path = root / name
        path.write_bytes(data)
        paths.append(path)
    truncated_gz = root / "truncated.pdb.gz"
    truncated_gz.write_bytes(gzip.compress(real_pdb)[:5000])
    not_gzip = root / "not_really.pdb.gz"
    not_gzip.write_bytes(real_pdb[:5000])
    folder = root / "folder.pdb"
    folder.mkdir()
    paths += [truncated_gz, not_gzip, folder, root / "does_not_exist.pdb"]
    return paths


def test_bad_inputs_raise_structure_error_naming_the_file(tmp_path, structures_dir):
    bad = _bad_corpus(tmp_path, structures_dir)
    assert len(bad) >= 15
    for path in bad:
        with pytest.raises(StructureError) as info:
            load_structure(path)
        message = str(info.value)
        assert str(path) in message, message
        assert "\n" not in message and len(message) < 300, message
        assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("workers", [0, 2])
def test_load_structures_skips_exactly_the_bad_files(tmp_path, structures_dir, workers):
    bad = _bad_corpus(tmp_path, structures_dir)
    good = sorted(structures_dir.iterdir())[:6]
    mixed = [p for pair in zip(good, bad) for p in pair] + bad[len(good):]
    proteins, skipped = load_structures(mixed, workers=workers, progress=False)
    assert [p.name for p in proteins] == [p.stem for p in good]
    assert [s[0] for s in skipped] == [str(p) for p in bad]
    assert all(str(path) in reason for path, reason in skipped)
    for protein, path in zip(proteins, good):
        assert torch.equal(protein.atom_pos, load_structure(path).atom_pos)


# ---- the gemmi-based parser the vectorised one replaced, kept as the slow reference -------------------------------
def _ref_append_best_conformer(res, layout, base, slots, xyz):
    """Append the atoms of the residue's highest-occupancy conformer; return its CA atom (or None)."""
    occupancy = {}
    for atom in res:
        if atom.altloc != "\0" and atom.occ > occupancy.get(atom.altloc, -1.0):
            occupancy[atom.altloc] = atom.occ
    best = max(occupancy, key=occupancy.get)  # the first letter wins ties
    ca = None
    for atom in res:
        if atom.altloc not in ("\0", best):
            continue
        slot = layout.get(atom.name)
        if slot is None:
            slot = layout.get(constants.ATOM_ALIASES.get(atom.name))
            if slot is None:
                continue
        if slot == 1:
            ca = atom
        slots.append(base + slot)
        xyz.extend(atom.pos.tolist())
    return ca


def _reference_arrays(path, chain=None):
    """The previous `read_structure_arrays`: gemmi builds the structure (first model, entities), Python walks its
    residues and atoms. Verbatim but for the error handling of unreadable files."""
    path = Path(path)
    compressed, fmt = path.suffix == ".gz", structure_format(path)
    if fmt == "cif" and not compressed:
        structure = gemmi.read_structure(str(path), format=gemmi.CoorFormat.Mmcif)
    else:
        data = gzip.decompress(path.read_bytes()) if compressed else path.read_bytes()
        if fmt == "pdb":
            end = data.find(b"\nENDMDL")
            data = data if end < 0 else data[: data.find(b"\n", end + 1) + 1]
            structure = gemmi.read_pdb_string(data.decode("latin-1"))
        else:
            structure = gemmi.make_structure_from_block(gemmi.cif.read_string(data.decode("latin-1")).sole_block())
        structure.setup_entities()
    if len(structure) == 0:
        raise StructureError(f"{path}: no model")
    model = structure[0]
    if model.has_hydrogen():
        model.remove_hydrogens()  # in C++: NMR models carry as many hydrogens as heavy atoms
    non_polymer = gemmi.EntityType.NonPolymer
    chain_ids: List[str] = []
    residue_types: List[int] = []
    numbers: List[int] = []
    icodes: List[int] = []
    chain_index: List[int] = []
    bfactors: List[float] = []
    slots: List[int] = []  # flat index residue * 14 + slot of every kept atom
    xyz: List[float] = []
    num_dropped = 0
    seen_chains = []
    add_slot, add_xyz = slots.append, xyz.extend
    aliases = constants.ATOM_ALIASES
    prev_key = None  # (chain, seqid) of the previous kept residue, for micro-heterogeneity
    prev_occ = 0.0
    prev_start = 0
    for ch in model:
        if chain is not None and ch.name != chain:
            continue
        seen_chains.append(ch.name)
        for res in ch:
            rtype = _TYPE_OF_RESIDUE.get(res.name, -1)
            if rtype == -1:
                rtype = residue_type_of(res.name)
            if rtype is None or res.entity_type == non_polymer:
                continue
            layout = constants.ATOM_SLOTS[rtype]
            slot_of = layout.get
            start = len(slots)
            base = len(residue_types) * constants.NUM_ATOM_SLOTS
            has_altloc = False
            ca = None
            # fast path: append every atom of the layout; residues with alternate locations are redone below
            for atom in res:
                slot = slot_of(atom.name)
                if slot is None:
                    slot = slot_of(aliases.get(atom.name))
                    if slot is None:
                        continue
                if atom.altloc != "\0":
                    has_altloc = True
                elif slot == 1:
                    ca = atom
                add_slot(base + slot)
                add_xyz(atom.pos.tolist())
            if has_altloc:
                del slots[start:], xyz[3 * start:]
                ca = _ref_append_best_conformer(res, layout, base, slots, xyz)
            if ca is None:
                del slots[start:], xyz[3 * start:]
                num_dropped += 1
                continue
            seqid = res.seqid
            key = (ch.name, seqid.num, seqid.icode)
            if key == prev_key:  # micro-heterogeneity: two residue types at one position
                if ca.occ <= prev_occ:
                    del slots[start:], xyz[3 * start:]
                    continue
                # this one replaces the previous residue: drop that one and move our atoms into its rows
                last = len(residue_types) - 1
                del residue_types[last:], numbers[last:], icodes[last:], chain_index[last:], bfactors[last:]
                ours_slots = [s - constants.NUM_ATOM_SLOTS for s in slots[start:]]
                ours_xyz = xyz[3 * start:]
                del slots[prev_start:], xyz[3 * prev_start:]
                start = len(slots)
                slots.extend(ours_slots)
                xyz.extend(ours_xyz)
            if not chain_ids or chain_ids[-1] != ch.name:
                chain_ids.append(ch.name)
            prev_key, prev_occ, prev_start = key, ca.occ, start
            residue_types.append(rtype)
            numbers.append(seqid.num)
            icodes.append(ord(seqid.icode) if seqid.icode not in ("\0", " ") else 32)
            chain_index.append(len(chain_ids) - 1)
            bfactors.append(ca.b_iso)

    if not residue_types:
        if chain is not None and chain not in seen_chains:
            raise StructureError(f"{path}: no chain {chain!r}")
        raise StructureError(f"{path}: no amino-acid residue with a CA atom")
    arrays = residue_arrays(str(path), slots, xyz, residue_types, numbers, icodes, chain_index, bfactors, chain_ids)
    meta = {"chain_ids": tuple(chain_ids), "name": protein_name(path), "num_dropped": num_dropped}
    return arrays, meta




def _assert_same_as_reference(path, chain=None):
    try:
        expected = _reference_arrays(path, chain)
    except (StructureError, RuntimeError) as error:  # the reference refuses: so must the new reader
        with pytest.raises(StructureError):
            read_structure_arrays(path, chain)
        return str(error)
    arrays, meta = read_structure_arrays(path, chain)
    assert meta == expected[1]
    for name, value in expected[0].items():
        assert arrays[name].dtype == value.dtype and np.array_equal(arrays[name], value), name
    return None



@pytest.mark.parametrize("path", structure_files(), ids=lambda p: p.name)
def test_real_structure_equals_the_gemmi_reference(path, tmp_path):
    """On every real file, the vectorised reader's arrays and metadata equal the gemmi-based reader's exactly:
    as a file, gzip-compressed, and for its first chain alone."""
    assert _assert_same_as_reference(path) is None
    gz = tmp_path / (path.name + ".gz")
    gz.write_bytes(gzip.compress(path.read_bytes(), compresslevel=1))
    assert _assert_same_as_reference(gz) is None
    first_chain = load_structure(path).chain_ids[0]
    assert _assert_same_as_reference(path, first_chain) is None
    assert _assert_same_as_reference(path, "nonexistent") is not None


def _record(kind, serial, name, resname, chain, number, x, alt=" ", occ=1.0, icode=" ", element=None):
    element = element if element is not None else name.strip()[0]
    return (f"{kind:<6s}{serial:5d} {name:<4s}{alt}{resname:>3s} {chain}{number:4d}{icode}   "
            f"{x:8.3f}{x / 2:8.3f}{-x:8.3f}{occ:6.2f}{x + 10:6.2f}          {element:>2s}  ")


def _residue(resname, chain, number, x, kind="ATOM", names=(" N  ", " CA ", " C  ", " O  "), **kw):
    return [_record(kind, 1, n, resname, chain, number, x + i, **kw) for i, n in enumerate(names)]


# synthetic files for the rules, each compared with the reference reader: (case, lines)
EDGE_CASES = {
    "altloc highest occupancy, first on ties": _residue("GLY", "A", 1, 0) + _residue("GLY", "A", 2, 10, alt="A", occ=.3)
    + _residue("GLY", "A", 2, 20, alt="B", occ=.7) + _residue("GLY", "A", 3, 30, alt="B", occ=.5)
    + _residue("GLY", "A", 3, 40, alt="A", occ=.5) + ["TER"],
    "altloc on a side chain only": _residue("SER", "A", 1, 0, names=(" N  ", " CA ", " C  ", " O  ", " CB "))
    + [_record("ATOM", 1, " OG ", "SER", "A", 1, 6, alt="A", occ=.4), _record("ATOM", 1, " OG ", "SER", "A", 1, 7,
                                                                               alt="B", occ=.6), "TER"],
    "hydrogen altloc does not choose the conformer": _residue("GLY", "A", 1, 0, alt="A", occ=.5)
    + _residue("GLY", "A", 1, 10, alt="B", occ=.5) + [_record("ATOM", 1, " HA2", "GLY", "A", 1, 9, alt="B", occ=.9),
                                                      "TER"],
    "micro-heterogeneity by CA occupancy": _residue("GLY", "A", 1, 0) + _residue("SER", "A", 2, 10, occ=.4)
    + _residue("THR", "A", 2, 20, occ=.6) + _residue("ALA", "A", 2, 30, occ=.6) + _residue("GLY", "A", 3, 40) + ["TER"],
    "insertion codes keep file order": _residue("GLY", "A", 10, 0) + _residue("GLY", "A", 10, 10, icode="B")
    + _residue("GLY", "A", 10, 20, icode="A") + _residue("GLY", "A", 9, 30) + ["TER"],
    "free amino acid after TER is a ligand": _residue("GLY", "A", 1, 0) + _residue("GLY", "A", 2, 10) + ["TER"]
    + _residue("LYS", "A", 101, 50, kind="HETATM") + _residue("HOH", "A", 201, 60, kind="HETATM", names=(" O  ",)),
    "no TER: gemmi's heuristic finds the ligands": _residue("GLY", "A", 1, 0) + _residue("GLY", "A", 2, 3.8)
    + _residue("MSE", "A", 3, 7.6, kind="HETATM", names=(" N  ", " CA ", " C  ", " O  ", "SE  "))
    + _residue("LYS", "A", 301, 50, kind="HETATM") + _residue("HOH", "A", 401, 60, kind="HETATM", names=(" O  ",)),
    "two TER in a chain: all left to the heuristic": _residue("GLY", "A", 1, 0) + ["TER"] + _residue("GLY", "A", 2, 3.8)
    + ["TER"] + _residue("ALA", "A", 101, 50, kind="HETATM"),
    "chain parts A, B, A": _residue("GLY", "A", 1, 0) + _residue("GLY", "B", 1, 10) + _residue("GLY", "A", 2, 20)
    + ["TER"],
    "a residue split by another": _residue("ALA", "A", 1, 0)[:1] + _residue("GLY", "A", 2, 10)
    + _residue("ALA", "A", 1, 0, names=(" N  ", " CA ", " C  ", " O  ", " CB "))[1:] + _residue("SER", "A", 3, 20)
    + ["TER"],
    "residue without CA dropped": _residue("GLY", "A", 1, 0) + _residue("GLY", "A", 2, 10, names=(" N  ", " C  "))
    + _residue("GLY", "A", 3, 20) + ["TER"],
    "modified and unknown residues": _residue("MSE", "A", 1, 0, kind="HETATM", names=(" N  ", " CA ", "SE  "))
    + _residue("TPO", "A", 2, 10, kind="HETATM") + _residue("UNK", "A", 3, 20) + _residue("XYZ", "A", 4, 30) + ["TER"],
    "hydrogens without element column": [r[:76] + "    " for r in _residue("GLY", "A", 1, 0)
                                         + _residue("GLY", "A", 1, 9, names=(" HA2", "1H  ", "HA3 "))] + ["TER"],
    "4-letter hydrogen names without element do not choose the conformer": [
        r[:76] + "    " for r in _residue("GLY", "A", 1, 0, alt="A", occ=.5) + _residue("GLY", "A", 1, 10, alt="B", occ=.5)
        + [_record("ATOM", 1, "HA21", "GLY", "A", 1, 9, alt="B", occ=.9), _record("ATOM", 1, "DA21", "GLY", "A", 1, 9,
                                                                                alt="B", occ=.9)]] + ["TER"],
    "no TER, a calcium named CA and a ligand carbon first": _residue("GLY", "A", 1, 0) + _residue("GLY", "A", 2, 3.8)
    + [_record("HETATM", 1, "CA  ", "CA", "A", 301, 40, element="CA")]
    + _residue("ACE", "A", 3, 7.0, kind="HETATM", names=(" O  ", " C  ", " CH3")) + _residue("GLY", "A", 4, 9)
    + _residue("LYS", "A", 302, 50, kind="HETATM"),
    "NMR models": ["MODEL        1"] + _residue("GLY", "A", 1, 0) + ["TER", "ENDMDL", "MODEL        2"]
    + _residue("GLY", "A", 1, 50) + ["TER", "ENDMDL"],
    "lower-case records and END before more atoms": [r.lower()[:6] + r[6:] for r in _residue("GLY", "A", 1, 0)]
    + ["TER", "END"] + _residue("GLY", "A", 2, 10),
}


@pytest.mark.parametrize("case", list(EDGE_CASES))
def test_rule_equals_the_gemmi_reference(case, tmp_path):
    path = tmp_path / "case.pdb"
    path.write_text("\n".join(EDGE_CASES[case]) + "\nEND\n")
    assert _assert_same_as_reference(path) is None, case
    assert _assert_same_as_reference(path, "A") is None, case
