"""Structure files that would load silently wrong: each is refused with one sentence naming the file and the line
(or record), or read by a rule written in the README. One table row per case."""
import gzip
import os
import re
import tracemalloc

import numpy as np
import pytest

from esm_gearnet.data import StructureError, io, load_structure, load_structures


def _atom(serial, name, resnum, x, resname="GLY", alt=" ", occ=1.0, b=20.0, chain="A"):
    """One 80-column ATOM record."""
    return (f"ATOM  {serial:5d} {name:<4s}{alt}{resname:>3s} {chain}{resnum:4d}    "
            f"{x:8.3f}{0.0:8.3f}{0.0:8.3f}{occ:6.2f}{b:6.2f}          {name.strip()[0]:>2s}  ")


def _glycines():
    """Two glycines: lines 1-4 residue 1, lines 5-8 residue 2 (line 6 its CA), then TER and END."""
    names = (" N  ", " CA ", " C  ", " O  ")
    return [_atom(4 * r + i + 1, n, r + 1, 10.0 * r + i) for r in range(2) for i, n in enumerate(names)]


def _pdb(edit=None, extra=()):
    """The two glycines, line 6 changed by `edit(line) -> line`, `extra` lines appended before TER."""
    lines = _glycines()
    if edit is not None:
        lines[5] = edit(lines[5])
    return ("\n".join(lines + list(extra) + ["TER", "END"]) + "\n").encode("latin-1")


def _columns(start, text):
    return lambda line: line[:start] + text + line[start + len(text):]


def _cif(rows=None, extra=()):
    """The two glycines as a minimal mmCIF `_atom_site` loop (data rows on lines 13-20), row 6 replaced."""
    head = ["data_test", "loop_"] + [f"_atom_site.{t}" for t in (
        "group_PDB", "id", "type_symbol", "label_atom_id", "label_comp_id", "label_asym_id", "label_seq_id",
        "Cartn_x", "Cartn_y", "Cartn_z")]
    body = [f"ATOM {4 * r + i + 1} {n[0]} {n} GLY A {r + 1} {10.0 * r + i:.3f} 0.000 0.000"
            for r in range(2) for i, n in enumerate(("N", "CA", "C", "O"))]
    for i, row in (rows or {}).items():
        body[i - 1] = row
    return ("\n".join(head + body + list(extra)) + "\n").encode("latin-1")


# (case, file name, content, what the sentence must say after the path)
REFUSED = [
    ("coordinate not a number", "a.pdb", _pdb(_columns(38, "   abcde")),
     r"line 6: the y coordinate is not a number \('abcde'\)"),
    ("coordinate blank", "a.pdb", _pdb(_columns(38, " " * 8)), r"line 6: the y coordinate is blank"),
    ("coordinate 1e30", "a.pdb", _pdb(_columns(30, "    1e30")),
     r"line 6: the x coordinate 1e30 is beyond ±100000 Å"),
    ("coordinate nan", "a.pdb", _pdb(_columns(46, "     nan")), r"line 6: the z coordinate is not a number \('nan'\)"),
    ("coordinate inf", "a.pdb", _pdb(_columns(46, "    -inf")), r"line 6: the z coordinate is not a number"),
    ("coordinate two numbers", "a.pdb", _pdb(_columns(30, " 1.2.300")), r"line 6: the x coordinate is not a number"),
    ("occupancy not a number", "a.pdb", _pdb(_columns(54, "  x.00")), r"line 6: the occupancy is not a number"),
    ("B-factor not a number", "a.pdb", _pdb(_columns(60, " 2O.00")), r"line 6: the B-factor is not a number"),
    ("NUL byte in a record", "a.pdb", _pdb(_columns(40, "\0")), r"line 6 holds a control byte \(0x00\)"),
    ("escape byte in a record", "a.pdb", _pdb(_columns(13, "\x1b")), r"line 6 holds a control byte \(0x1b\)"),
    ("DEL byte in a record", "a.pdb", _pdb(_columns(70, "\x7f")), r"line 6 holds a control byte \(0x7f\)"),
    ("duplicate atom record", "a.pdb", _pdb(extra=[_glycines()[5]]), r"line 9 repeats the atom of line 6"),
    ("duplicate: no altloc and the chosen altloc", "a.pdb",
     _pdb(extra=[_atom(9, " CA ", 2, 11.0, alt="A")]), r"line 9 repeats the atom of line 6"),
    ("residue number not an integer", "a.pdb",
     _pdb(extra=[_atom(9, n, 3, 30.0 + i)[:22] + "  x3" + _atom(9, n, 3, 30.0 + i)[26:]
                 for i, n in enumerate((" N  ", " CA "))]), r"line 9: the residue number 'x3' is not an integer"),
    ("record too short for its coordinates", "a.pdb", _pdb(lambda line: line[:50]),
     r"line 6: the atom record is too short \(50 characters"),
    ("MODEL inside a model", "a.pdb", _pdb(extra=["MODEL        2"]), r"line 9: MODEL record inside a model"),
    ("mmCIF text in a .pdb", "a.pdb", b"data_x\n" + _cif(), r"line 1 starts an mmCIF data block"),
    ("mmCIF coordinate '?'", "a.cif", _cif({6: "ATOM 6 C CA GLY A 2 ? 0.000 0.000"}),
     r"line 18: the x coordinate is not a number \('\?'\)"),
    ("mmCIF coordinate not a number", "a.cif", _cif({6: "ATOM 6 C CA GLY A 2 11.000 abc 0.000"}),
     r"line 18: the y coordinate is not a number \('abc'\)"),
    ("mmCIF coordinate 1e30", "a.cif", _cif({6: "ATOM 6 C CA GLY A 2 11.000 0.000 1e30"}),
     r"line 18: the z coordinate 1e30 is beyond ±100000 Å"),
    ("mmCIF control byte", "a.cif", _cif({6: "ATOM 6 C CA GLY A 2 11.000 0.0\x0100 0.000"}),
     r"line 18 holds a control byte \(0x01\)"),
    ("mmCIF duplicate atom record", "a.cif", _cif(extra=["ATOM 9 C CA GLY A 2 11.000 0.000 0.000"]),
     r"line 21 repeats the atom of line 18"),
    ("mmCIF value starting like a tag", "a.cif", _cif({6: "ATOM 6 C CA GLY _ 2 11.000 0.000 0.000"}),
     r"not a readable mmCIF file \(line \d+: Wrong number of values in loop _atom_site"),
]


@pytest.mark.parametrize("case, name, content, said", REFUSED, ids=[c[0] for c in REFUSED])
def test_bad_record_is_refused_naming_file_and_line(tmp_path, case, name, content, said):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(StructureError) as info:
        load_structure(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    assert re.search(said, message), message


@pytest.mark.parametrize("case, name, content, said", REFUSED[:3], ids=[c[0] for c in REFUSED[:3]])
def test_bad_file_among_good_ones_is_reported_and_skipped(tmp_path, case, name, content, said):
    good, bad = tmp_path / "good.pdb", tmp_path / name
    good.write_bytes(_pdb())
    bad.write_bytes(content)
    proteins, skipped = load_structures([good, bad, good], progress=False)
    assert [p.name for p in proteins] == ["good", "good"]
    assert len(skipped) == 1 and skipped[0][0] == str(bad) and re.search(said, skipped[0][1])


# (case, file name, content, what loads): rules that resolve instead of refusing
RESOLVED = [
    ("blank occupancy reads 1.0 (wins a tie of altlocs over 0.50)", "a.pdb",
     _pdb(extra=[_atom(9, " CA ", 3, 30.0, alt="A", occ=0.5), _atom(10, " CA ", 3, 40.0, alt="B")[:54] + " " * 6
                 + _atom(10, " CA ", 3, 40.0)[60:]]), {"ca_x": [1.0, 11.0, 40.0]}),
    ("blank B-factor reads 0.0", "a.pdb", _pdb(_columns(60, " " * 6)), {"bfactor": [20.0, 0.0]}),
    ("record ending after the coordinates", "a.pdb", _pdb(lambda line: line[:54]), {"bfactor": [20.0, 0.0]}),
    ("minimal mmCIF: no label_alt_id, pdbx_PDB_ins_code, occupancy, B, model", "a.cif", _cif(),
     {"ca_x": [1.0, 11.0], "sequence": "GG"}),
    ("mmCIF without type_symbol", "a.cif", _cif().replace(b"_atom_site.type_symbol\n", b"").replace(b" C CA ", b" CA ")
     .replace(b" N N ", b" N ").replace(b" C C ", b" C ").replace(b" O O ", b" O "), {"ca_x": [1.0, 11.0]}),
    ("mmCIF single atom as key-value pairs", "a.cif",
     b"data_one\n_atom_site.id 1\n_atom_site.label_atom_id CA\n_atom_site.label_comp_id GLY\n"
     b"_atom_site.label_asym_id A\n_atom_site.label_seq_id 7\n_atom_site.Cartn_x 1.5\n_atom_site.Cartn_y 2\n"
     b"_atom_site.Cartn_z 3\n", {"ca_x": [1.5], "number": [7]}),
]


@pytest.mark.parametrize("case, name, content, expected", RESOLVED, ids=[c[0] for c in RESOLVED])
def test_rule_resolves_the_record(tmp_path, case, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    protein = load_structure(path)
    if "ca_x" in expected:
        assert protein.pos[:, 0].tolist() == expected["ca_x"]
    if "bfactor" in expected:
        assert protein.bfactor.tolist() == expected["bfactor"]
    if "sequence" in expected:
        assert protein.sequence == expected["sequence"]
    if "number" in expected:
        assert protein.residue_number.tolist() == expected["number"]


def test_unreadable_file_says_permission_denied(tmp_path, monkeypatch):
    path = tmp_path / "locked.pdb"
    path.write_bytes(_pdb())
    path.chmod(0)
    if os.geteuid() == 0:  # root reads anything: make open() fail as it does for everyone else
        def denied(file, *args, **kwargs):
            raise PermissionError(13, "Permission denied", str(file))
        monkeypatch.setattr(io, "open", denied, raising=False)
    with pytest.raises(StructureError, match=f"^{re.escape(str(path))}: permission denied; make the file readable"):
        load_structure(path)
    path.chmod(0o644)


def _bomb(path, payload_bytes):
    """A valid PDB whose gzip holds `payload_bytes` of blank lines after it: a decompression bomb."""
    with gzip.open(path, "wb", compresslevel=9) as handle:
        handle.write(_pdb().replace(b"END\n", b""))
        block = b" " * 79 + b"\n"
        for _ in range(payload_bytes // (len(block) * 1000)):
            handle.write(block * 1000)
    return path


def test_decompression_bomb_is_refused_without_holding_it(tmp_path, monkeypatch):
    bomb = _bomb(tmp_path / "bomb.pdb.gz", 16 << 20)  # 16 MiB behind about 20 KB
    assert bomb.stat().st_size < 100_000
    monkeypatch.setattr(io, "MAX_STRUCTURE_BYTES", 1 << 20)
    tracemalloc.start()
    try:
        with pytest.raises(StructureError, match=r"bomb\.pdb\.gz: decompresses to more than 1048576 bytes"):
            load_structure(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 << 20, peak  # the cap and a few chunks in memory at most, never the 16 MiB


def test_cap_is_an_argument_and_real_files_pass_the_default(tmp_path):
    bomb = _bomb(tmp_path / "bomb.pdb.gz", 2 << 20)
    with pytest.raises(StructureError, match="decompresses to more than 100000 bytes"):
        io.read_structure_arrays(bomb, max_bytes=100_000)
    arrays, _ = io.read_structure_arrays(bomb)  # under the default cap it is a real (padded) file
    assert len(arrays["residue_type"]) == 2
    plain = tmp_path / "big.pdb"
    plain.write_bytes(_pdb() + b" " * 200_000)
    with pytest.raises(StructureError, match="the file is larger than 100000 bytes"):
        io.read_structure_arrays(plain, max_bytes=100_000)


def test_fixed_point_reader_is_exact(tmp_path):
    """The vectorised number reader gives the float parser's value for every form, sign and width."""
    rng = np.random.default_rng(0)
    texts = [fmt % v for fmt in ("%8.3f", "%8.2f", "%8.0f", "%6.2f", "%5.1f", "%8.4f")
             for v in rng.uniform(-999, 9999, 300)] + ["  -0.000", "    0.500", "12345678", "-1234567"]
    words = np.array([t.rjust(8)[-8:].encode() for t in texts], "S8").view("<u8").reshape(-1, 1).copy()
    values, status = io._parse_numbers(words, lambda row, j: texts[row].encode())
    assert (status == 0).all()
    assert values[:, 0].tolist() == [float(t.rjust(8)[-8:]) for t in texts]
