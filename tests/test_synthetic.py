"""Ideal backbones: the geometry they promise, and a PDB round trip through the parser."""
import math

import torch

from esm_gearnet.data import load_structure
from esm_gearnet.data.synthetic import ANGLE, BOND, backbone_protein, write_pdb


def _angle(a, b, c):
    v1, v2 = a - b, c - b
    return math.degrees(math.acos(float(v1 @ v2 / (v1.norm() * v2.norm()))))


def _dihedral(a, b, c, d):
    b0, b1, b2 = a - b, c - b, d - c
    b1 = b1 / b1.norm()
    v = b0 - (b0 @ b1) * b1
    w = b2 - (b2 @ b1) * b1
    return math.degrees(math.atan2(float(torch.linalg.cross(b1, v) @ w), float(v @ w)))


def test_bond_lengths_angles_and_dihedrals_are_ideal():
    protein = backbone_protein("MKTAYIAKQRQISFVKSHFSRQ", "LHHHHHHHHLLLEEEEELLEEE")
    x = protein.backbone.double()
    for i in range(len(protein) - 1):
        n, ca, c, o = x[i]
        assert abs(float((ca - n).norm()) - BOND["N-CA"]) < 1e-4
        assert abs(float((c - ca).norm()) - BOND["CA-C"]) < 1e-4
        assert abs(float((x[i + 1, 0] - c).norm()) - BOND["C-N"]) < 1e-4
        assert abs(float((o - c).norm()) - BOND["C-O"]) < 1e-4
        assert abs(_angle(n, ca, c) - ANGLE["N-CA-C"]) < 1e-3
        assert abs(_angle(ca, c, x[i + 1, 0]) - ANGLE["CA-C-N"]) < 1e-3
        assert abs(abs(_dihedral(ca, c, x[i + 1, 0], x[i + 1, 1])) - 180.0) < 1e-3  # trans peptide
    # helix residues have phi -57, psi -47
    phi = _dihedral(x[2, 2], x[3, 0], x[3, 1], x[3, 2])
    psi = _dihedral(x[3, 0], x[3, 1], x[3, 2], x[4, 0])
    assert abs(phi + 57) < 1e-3 and abs(psi + 47) < 1e-3
    # an ideal alpha helix rises 1.5 A per residue: CA(i) - CA(i+3) about 5.0-5.4 A
    assert 4.8 < float((x[5, 1] - x[2, 1]).norm()) < 5.6


def test_pdb_round_trip(tmp_path):
    protein = backbone_protein("GASPVTCILN", "HHHHHLLLEE", name="toy")
    write_pdb(protein, tmp_path / "toy.pdb")
    back = load_structure(tmp_path / "toy.pdb")
    assert back.sequence == protein.sequence and back.name == "toy"
    torch.testing.assert_close(back.backbone, protein.backbone, atol=1e-3, rtol=0)
    assert torch.equal(back.atom_mask, protein.atom_mask)
