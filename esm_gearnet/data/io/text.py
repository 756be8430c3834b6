"""Text as bytes and 8-byte words: the words' constants, control bytes refused, line numbers of offsets, and
collision-free hashing of word codes into lookup tables."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from .errors import StructureError

_U64 = np.uint64
_SPACES = _U64(0x2020202020202020)  # 8 characters as a little-endian word: the first one in the lowest byte
_BYTES_BELOW = np.array([(1 << 8 * n) - 1 for n in range(9)], np.uint64)  # the first n characters of a word


_CONTROL_BYTE = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def _refuse_control_bytes(data: bytes, path: Path, newlines: Optional[int] = None) -> None:
    """Refuse bytes below 32 other than tab, line feed and carriage return, and DEL (`newlines`: the count of
    line feeds, when known)."""
    arr = np.frombuffer(data, np.uint8)
    allowed = np.count_nonzero(arr == 10) if newlines is None else newlines
    if b"\r" in data or b"\t" in data:
        allowed += data.count(b"\r") + data.count(b"\t")
    if np.count_nonzero(arr < 32) != allowed or b"\x7f" in data:  # fast; the regex only finds the line
        at = _CONTROL_BYTE.search(data).start()
        raise StructureError(f"{path}: line {_line_of(data, at)} holds a control byte (0x{data[at]:02x}); the file "
                             "is damaged or not a text file.")


def _perfect_hash(keys: np.ndarray, bits: int = 10) -> Tuple[np.integer, np.ndarray]:
    """A multiplier hashing the distinct unsigned `keys` into 2**bits slots without collision (`(key * m) >>
    (key bits - bits)`, found by a seeded search), and the index of the key in each slot (0 in empty ones)."""
    rng = np.random.default_rng(0)
    size = 8 * keys.itemsize
    while True:
        multiplier = keys.dtype.type(int(rng.integers(1 << (size - 2))) * 2 + 1)
        slots = (keys * multiplier) >> keys.dtype.type(size - bits)
        if len(np.unique(slots)) == len(keys):
            index = np.zeros(1 << bits, np.int64)
            index[slots] = np.arange(len(keys))
            return multiplier, index
