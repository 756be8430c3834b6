"""Residue vocabulary and the per-residue heavy-atom layout.

Residue types follow the original ESM-GearNet / TorchDrug order, so that checkpoints trained on it load
unchanged::

    G A S P V T C I L N D Q K E M H F R Y W  ->  0 .. 19,   unknown -> 20

Heavy atoms are stored in a fixed 14-slot layout per residue ("atom14"): slots 0-3 are always the backbone
N, CA, C, O, then the side-chain atoms of that residue type in PDB naming. Unused slots are masked out.
"""

RESIDUE_LETTERS = "GASPVTCILNDQKEMHFRYW"
NUM_RESIDUE_TYPES = 20  # standard amino acids
UNKNOWN = 20  # index of the unknown residue type; one-hot inputs have 21 channels
UNKNOWN_LETTER = "X"

THREE_TO_ONE = {
    "GLY": "G", "ALA": "A", "SER": "S", "PRO": "P", "VAL": "V", "THR": "T", "CYS": "C", "ILE": "I",
    "LEU": "L", "ASN": "N", "ASP": "D", "GLN": "Q", "LYS": "K", "GLU": "E", "MET": "M", "HIS": "H",
    "PHE": "F", "ARG": "R", "TYR": "Y", "TRP": "W",
}
ONE_TO_THREE = {v: k for k, v in THREE_TO_ONE.items()}
LETTER_TO_TYPE = {letter: i for i, letter in enumerate(RESIDUE_LETTERS)}

BACKBONE_ATOMS = ("N", "CA", "C", "O")
NUM_ATOM_SLOTS = 14
SIDE_CHAIN_ATOMS = {
    "GLY": (),
    "ALA": ("CB",),
    "SER": ("CB", "OG"),
    "PRO": ("CB", "CG", "CD"),
    "VAL": ("CB", "CG1", "CG2"),
    "THR": ("CB", "OG1", "CG2"),
    "CYS": ("CB", "SG"),
    "ILE": ("CB", "CG1", "CG2", "CD1"),
    "LEU": ("CB", "CG", "CD1", "CD2"),
    "ASN": ("CB", "CG", "OD1", "ND2"),
    "ASP": ("CB", "CG", "OD1", "OD2"),
    "GLN": ("CB", "CG", "CD", "OE1", "NE2"),
    "LYS": ("CB", "CG", "CD", "CE", "NZ"),
    "GLU": ("CB", "CG", "CD", "OE1", "OE2"),
    "MET": ("CB", "CG", "SD", "CE"),
    "HIS": ("CB", "CG", "ND1", "CD2", "CE1", "NE2"),
    "PHE": ("CB", "CG", "CD1", "CD2", "CE1", "CE2", "CZ"),
    "ARG": ("CB", "CG", "CD", "NE", "CZ", "NH1", "NH2"),
    "TYR": ("CB", "CG", "CD1", "CD2", "CE1", "CE2", "CZ", "OH"),
    "TRP": ("CB", "CG", "CD1", "CD2", "NE1", "CE2", "CE3", "CZ2", "CZ3", "CH2"),
}
# atom name -> slot, per residue type index (the unknown type keeps its backbone and CB)
ATOM_SLOTS = [
    {name: slot for slot, name in enumerate(BACKBONE_ATOMS + SIDE_CHAIN_ATOMS[ONE_TO_THREE[letter]])}
    for letter in RESIDUE_LETTERS
] + [{name: slot for slot, name in enumerate(BACKBONE_ATOMS + ("CB",))}]

# Atom names in modified residues that stand for another name in the parent residue.
ATOM_ALIASES = {"SE": "SD"}  # selenomethionine


def residue_letter(code: str) -> str:
    """One-letter code of a residue's standard parent (`MSE` -> `M`), or `X` when it has none.

    Standard amino acids map directly; modified ones through the chemical component dictionary that
    gemmi carries (its lower-case one-letter codes name the parent amino acid).

    DEVIATION: the original (TorchDrug's parser, and `Atom3DDataset.protein_from_data_frame` for PSR/MSP) made
    every unknown or modified residue a glycine (type 0), a real amino acid that ESM and the residue-type targets
    then read as such; here a modified residue is its parent amino acid and anything else is unknown (type 20,
    ESM's `<unk>`).
    """
    letter = THREE_TO_ONE.get(code)
    if letter is not None:
        return letter
    import gemmi

    info = gemmi.find_tabulated_residue(code)
    if info is not None and info.is_amino_acid():
        parent = info.one_letter_code.upper()
        if parent in LETTER_TO_TYPE:
            return parent
    return UNKNOWN_LETTER


def is_amino_acid(code: str) -> bool:
    """Whether a residue name is an amino acid (standard, modified, or `UNK`)."""
    if code in THREE_TO_ONE:
        return True
    import gemmi

    info = gemmi.find_tabulated_residue(code)
    return info is not None and info.is_amino_acid()
