"""The atom table both readers fill (`_Atoms`), and the element and change helpers both use."""
from __future__ import annotations

from typing import Callable, NamedTuple, Tuple

import numpy as np


class _Atoms(NamedTuple):
    """The atom records of the first model, in file order (A atoms). Integer codes are raw bytes read as
    little-endian integers."""
    chain: Tuple[np.ndarray, ...]  # [A] codes of the chain name
    key: Tuple[np.ndarray, ...]    # [A] the residue identity in a chain part: name (key[0]), number, icode, segment
    name: np.ndarray      # [A] uint32 code of the atom name (4 bytes as written; 0 for longer names)
    altloc: np.ndarray    # [A] uint8, 32 (a space) = none
    hydrogen: np.ndarray  # [A] bool
    numbers: np.ndarray   # [A, 6] float64 (C-contiguous): x, y, z, occupancy, B-factor, residue number (the
                          # last where `number_status` is 0)
    number_status: np.ndarray  # [A] int8, of the residue number: 0 a number, 1 blank, 2 not a number (`number_text`)
    number_text: Callable[[int], str]  # atom index -> its residue number as written
    icode: np.ndarray     # [A] uint8, 32 = none
    where: Callable[[int], str]  # atom index -> "line N", for messages
    entity: Callable      # (residues, water [R], candidate [R]) -> [R] bool: the residue is a ligand or water
    merge_chain_parts: bool


def _element_of_symbol(c0: np.ndarray, c1: np.ndarray) -> np.ndarray:
    """gemmi's element of a 2-character symbol (`find_element`) as a class: 1 H or D, 2 C, 3 anything else."""
    first, second = c0 & 0xDF, c1 & 0xDF  # upper case; a space reads as 0
    single = np.where(first == 0, second, np.where(second < 14, first, 0))  # a one-letter symbol, or 0
    return np.where((single == 72) | (single == 68), 1, np.where(single == 67, 2, 3)).astype(np.uint8)


def _changes(columns: Tuple[np.ndarray, ...]) -> np.ndarray:
    """[A] bool: the atom differs from the one before in any of the columns (True for the first atom)."""
    change = np.empty(len(columns[0]), bool)
    change[0] = True
    change[1:] = columns[0][1:] != columns[0][:-1]
    for column in columns[1:]:
        change[1:] |= column[1:] != column[:-1]
    return change
