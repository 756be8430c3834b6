"""Strict numbers from fixed-width fields: fixed-point fields read vectorised and exactly by SWAR arithmetic,
the rest by a strict pattern; blanks, non-numbers and coordinates beyond `COORDINATE_LIMIT` refused by record."""
from __future__ import annotations

import re
from typing import Callable, Tuple

import numpy as np

from .errors import StructureError
from .text import _U64, _perfect_hash

COORDINATE_LIMIT = 1e5  # Å; no structure spans a tenth of a millimetre


# An 8-character field is one uint64 (its first character in the lowest byte). Its form is that word with each digit
# byte replaced by 0xFF: right-aligned fixed-point numbers ('  -1.234', '    12') have one of 60 forms, which give
# the position of the decimal point and the sign; any other field is read on its own with a strict pattern.
_NUMBER = re.compile(rb"\s*[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?\s*")


def _number_forms():
    """The forms, and per form: the mask of the digit bytes before the point (they move up one byte, over it)
    and the signed power of ten to divide the joined digits by."""
    forms = {}
    for point in range(1, 9):  # 8: no point
        for digits in range(1, point + 1):
            for minus in (0, 1)[: 1 + (digits < point)]:
                text = b" " * (point - digits - minus) + b"-" * minus + b"\xff" * digits
                move, scale = 0, 1.0
                if point < 8:
                    text += b"." + b"\xff" * (7 - point)
                    move, scale = (1 << 8 * point) - 1, 10.0 ** (7 - point)
                forms[int.from_bytes(text, "little")] = (move, -scale if minus else scale)
    return (np.array(list(forms), np.uint64), np.array([m for m, _ in forms.values()], np.uint64),
            np.array([d for _, d in forms.values()]))


_FORMS, _FORM_MOVE, _FORM_DIVISOR = _number_forms()
_FORM_HASH, _FORM_OF_SLOT = _perfect_hash(_FORMS)
_ROWS_AT_ONCE = 2048


def _parse_numbers(words: np.ndarray, text: Callable[[int, int], bytes]) -> Tuple[np.ndarray, np.ndarray]:
    """Numbers in right-aligned, space-padded 8-character fields.

    The fixed-point forms are read vectorised and exactly: the digits joined into an integer by SWAR arithmetic
    (simdjson's eight-digit trick), divided once by a power of ten (so correctly rounded, like any float parser).
    Args:
        words: [n, k] uint64 (C-contiguous), the fields as words.
        text: (row, field) -> the field's full text, for the fields in no fixed-point form.
    Returns:
        (values [n, k] float64, status [n, k] int8: 0 a number, 1 blank, 2 not a number)
    """
    if len(words) > _ROWS_AT_ONCE:  # temporaries under glibc's mmap threshold: no page faults
        parts = [_parse_numbers(words[i:i + _ROWS_AT_ONCE], lambda row, j, i=i: text(row + i, j))
                 for i in range(0, len(words), _ROWS_AT_ONCE)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    digit = words.view(np.uint8) - np.uint8(48)
    is_digit = (digit < 10).view("<u8")
    mask = is_digit * _U64(0xFF)
    form = words | mask
    at = _FORM_OF_SLOT[(form * _FORM_HASH) >> _U64(54)]
    ok = _FORMS[at] == form
    x = digit.view("<u8") & mask  # the digits' values, 0 elsewhere
    x += (x & _FORM_MOVE[at]) * _U64(255)  # the digits before the point move up one byte, over it
    x = (x * _U64(2561)) >> _U64(8)
    x = ((x & _U64(0x00FF00FF00FF00FF)) * _U64(6553601)) >> _U64(16)
    x = ((x & _U64(0x0000FFFF0000FFFF)) * _U64(42949672960001)) >> _U64(32)
    values = x / _FORM_DIVISOR[at]
    status = np.zeros(words.shape, np.int8)
    for row, j in zip(*np.nonzero(~ok)) if not ok.all() else ():
        raw = text(int(row), int(j))
        if not raw.strip():
            status[row, j] = 1
        elif _NUMBER.fullmatch(raw):
            values[row, j] = float(raw)
        else:
            status[row, j] = 2
    return values, status


_NUMBER_NAMES = ("x coordinate", "y coordinate", "z coordinate", "occupancy", "B-factor", "residue number")
_NUMBER_DEFAULTS = np.array([np.nan, np.nan, np.nan, 1.0, 0.0, np.nan])  # for blank fields (NaN: refused)
_NUMBER_LIMITS = np.array([COORDINATE_LIMIT] * 3 + [float(np.finfo(np.float32).max)] * 2 + [np.inf])


def _check_numbers(path, where: Callable[[int], str], text: Callable[[int, int], bytes], values: np.ndarray,
                   status: np.ndarray) -> np.ndarray:
    """Of the x, y, z, occupancy, B-factor and residue-number columns [A, 6], the first five: blanks read as
    their default; refused (naming the record) when a coordinate is blank, anything is not a number, or beyond
    its limit. The residue numbers are checked later, for the residues kept."""
    problem = np.zeros((1, 5), np.int8)  # per field: 1 blank without a default, 2 not a number, 3 too far
    if status[:, :5].any():
        blank = status[:, :5] == 1
        values = values.copy()
        values[:, :5] = np.where(blank, _NUMBER_DEFAULTS[:5], values[:, :5])
        problem = np.where(blank & ~np.isnan(_NUMBER_DEFAULTS[:5]), 0, status[:, :5])
    far = ~(np.abs(values) <= _NUMBER_LIMITS)
    if problem.any() or far.any():
        problem = np.where(far[:, :5] & (problem == 0), 3, problem)
        row, j = (int(i) for i in np.argwhere(problem)[0])
        field = text(row, j).decode("latin-1").strip()
        what = ("is blank", f"is not a number ({field!r})",
                f"{field} is beyond ±{_NUMBER_LIMITS[j]:g} Å" if j < 3 else f"{field} is too large")
        raise StructureError(f"{path}: {where(row)}: the {_NUMBER_NAMES[j]} {what[problem[row, j] - 1]}; fix or "
                             "remove that record.")
    return values
