"""Ideal protein backbones from dihedral angles (no data needed): the built-in demo's structures.

Atoms are placed one after the other by the natural extension reference frame method: each new atom from
the three before it, a bond length, a bond angle and a dihedral, with Engh & Huber backbone geometry.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from . import constants
from .protein import Protein

BOND = {"N-CA": 1.458, "CA-C": 1.525, "C-N": 1.329, "C-O": 1.231}
ANGLE = {"N-CA-C": 111.2, "CA-C-N": 116.2, "C-N-CA": 121.7, "CA-C-O": 120.5}
SECONDARY_STRUCTURE = {"helix": (-57.0, -47.0), "strand": (-120.0, 130.0), "loop": (-75.0, 145.0)}


def _place(a, b, c, length, angle, dihedral):
    """Position of d with |cd| = length, angle(b, c, d) = angle, dihedral(a, b, c, d) = dihedral (degrees)."""
    angle, dihedral = math.radians(angle), math.radians(dihedral)
    bc = c - b
    bc /= np.linalg.norm(bc)
    normal = np.cross(b - a, bc)
    normal /= np.linalg.norm(normal)
    local = np.array([-length * math.cos(angle),
                      length * math.sin(angle) * math.cos(dihedral),
                      length * math.sin(angle) * math.sin(dihedral)])
    frame = np.stack([bc, np.cross(normal, bc), normal], axis=1)
    return c + frame @ local


def ideal_backbone(phi: Sequence[float], psi: Sequence[float], omega: float = 180.0) -> np.ndarray:
    """Backbone coordinates [L, 4, 3] (N, CA, C, O) for the given dihedrals (degrees, one per residue)."""
    length = len(phi)
    n = np.array([0.0, 0.0, 0.0])
    ca = np.array([BOND["N-CA"], 0.0, 0.0])
    theta = math.radians(180.0 - ANGLE["N-CA-C"])
    c = ca + BOND["CA-C"] * np.array([math.cos(theta), math.sin(theta), 0.0])
    atoms = np.zeros((length, 4, 3))
    for i in range(length):
        atoms[i, :3] = n, ca, c
        next_n = _place(n, ca, c, BOND["C-N"], ANGLE["CA-C-N"], psi[i])
        atoms[i, 3] = _place(n, ca, c, BOND["C-O"], ANGLE["CA-C-O"], psi[i] + 180.0)
        next_ca = _place(ca, c, next_n, BOND["N-CA"], ANGLE["C-N-CA"], omega)
        next_c = _place(c, next_n, next_ca, BOND["CA-C"], ANGLE["N-CA-C"], phi[i + 1] if i + 1 < length else -60.0)
        n, ca, c = next_n, next_ca, next_c
    return atoms


def backbone_protein(sequence: str, secondary_structure: str, name: str = "") -> Protein:
    """A Protein with an ideal backbone; `secondary_structure` has one of H (helix), E (strand), L (loop)
    per residue."""
    if len(sequence) != len(secondary_structure):
        raise ValueError("backbone_protein: sequence and secondary_structure must have the same length.")
    kinds = {"H": "helix", "E": "strand", "L": "loop"}
    angles = [SECONDARY_STRUCTURE[kinds[s]] for s in secondary_structure]
    backbone = ideal_backbone([a[0] for a in angles], [a[1] for a in angles])
    protein = Protein.from_sequence(sequence, name=name)
    atom_pos = protein.atom_pos.clone()
    atom_mask = protein.atom_mask.clone()
    atom_pos[:, :4] = torch.from_numpy(backbone).float()
    atom_mask[:, :4] = True
    return protein.replace(atom_pos=atom_pos, atom_mask=atom_mask)


def write_pdb(protein: Protein, path) -> None:
    """Write the protein's atoms as PDB ATOM records (atom14 slots in order)."""
    with open(path, "w") as handle:
        handle.write(pdb_text(protein))


def pdb_text(protein: Protein) -> str:
    """The protein's atoms as the text of a PDB file: ATOM records, atom14 slots in order, then END."""
    three = [constants.ONE_TO_THREE[c] for c in constants.RESIDUE_LETTERS] + ["UNK"]
    lines, serial = [], 1
    chain = protein.chain
    for i in range(protein.num_residue):
        rtype = int(protein.residue_type[i])
        names = sorted(constants.ATOM_SLOTS[rtype], key=constants.ATOM_SLOTS[rtype].get)
        icode = chr(int(protein.insertion_code[i])).strip()
        for slot, atom in enumerate(names):
            if not protein.atom_mask[i, slot]:
                continue
            x, y, z = protein.atom_pos[i, slot].tolist()
            lines.append(f"ATOM  {serial:5d} {atom:<4s} {three[rtype]:>3s} {chain[i][:1]:1s}"
                         f"{int(protein.residue_number[i]):4d}{icode:1s}   {x:8.3f}{y:8.3f}{z:8.3f}"
                         f"{1.0:6.2f}{float(protein.bfactor[i]):6.2f}           {atom[0]:>1s}")
            serial += 1
    return "\n".join(lines) + "\nEND\n"
