"""mmCIF files: the `_atom_site` loop tokenised by NumPy (by gemmi where the text is not in the simple form)
into an `_Atoms` table, and which residues are ligands (by `_entity`, `_entity_poly` and `_struct_asym`)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Sequence, Tuple

import numpy as np

from .atoms import _Atoms, _element_of_symbol
from .errors import StructureError, _first_line
from .numbers import _check_numbers, _parse_numbers
from .text import _BYTES_BELOW, _SPACES, _U64, _line_of

_CIF_SPECIAL = (b"'", b'"', b"#", b";", b"_", b"$", b"[", b"]")  # quotes, comments, text fields, tags, reserved
_CIF_END_OF_LOOP = (b"#", b"_", b"loop_", b"data_", b"save_", b"global_", b"stop_")
_MAY_END_LOOP = np.zeros(256, bool)  # first characters of the lines that may end a loop
_MAY_END_LOOP[[ord(c) for c in "#_dDgGlLsS"]] = True


class _Tokens(NamedTuple):
    """The `_atom_site` table as byte offsets into `text`: column j of row i is token i * width + j."""
    text: bytes          # the file (or gemmi's tokens), and 8 spaces
    start: np.ndarray
    end: np.ndarray
    tags: Dict[str, int]
    where: Callable[[int], str]  # token index -> where it is, for messages

    def words(self, span: Tuple[np.ndarray, np.ndarray], count: int = 0) -> Tuple[np.ndarray, ...]:
        """Tokens as uint64 words of 8 characters, left-aligned and space-padded; `count` words (0: enough for
        the longest)."""
        start, end = span
        count = count or max(1, -(-int((end - start).max(initial=1)) // 8))
        windows = np.ndarray((len(self.text) - 7,), "<u8", self.text, 0, (1,))  # the 8 bytes at every offset
        words = []
        for k in range(count):
            size = _BYTES_BELOW[np.clip(end - start - 8 * k, 0, 8)]
            words.append(windows[np.minimum(start + 8 * k, len(windows) - 1)] & size | _SPACES & ~size)
        return tuple(words)

    def distinct(self, span: Tuple[np.ndarray, np.ndarray]) -> Tuple[List[str], np.ndarray]:
        """The distinct tokens as str, and the index of each token among them."""
        words = self.words(span)
        if len(words) > 1:  # tokens longer than 8 characters: one by one
            strings = [self.text[s:e].decode("latin-1") for s, e in zip(*span)]
            return strings, np.arange(len(strings))
        _, first, inverse = np.unique(words[0], return_index=True, return_inverse=True)
        return [self.text[span[0][i]:span[1][i]].decode("latin-1") for i in first.tolist()], inverse.ravel()

    def number_words(self, span: Tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        """Tokens as right-aligned, space-padded words; longer tokens as a word of no number form."""
        start, end = span
        windows = np.ndarray((len(self.text) - 7,), "<u8", self.text, 0, (1,))
        length = end - start
        kept = ~_BYTES_BELOW[np.maximum(8 - length, 0)]
        words = windows[np.maximum(end - 8, 0)] & kept | _SPACES & ~kept
        words[length > 8] = _U64(0xFFFFFFFFFFFFFFFF)
        return words


def _cif_tokens(data: bytes, path: Path) -> _Tokens:
    """Tokenise the `_atom_site` loop with NumPy (whitespace-separated, quotes without spaces inside); anything
    else CIF allows (text fields, comments, quoted spaces, a single-row table) goes through gemmi's parser."""
    first_tag = data.find(b"\n_atom_site.") + 1
    if first_tag and data[data.rfind(b"\n", 0, first_tag - 1) + 1:first_tag].strip().lower() == b"loop_":
        tags, body = [], first_tag
        while data.startswith(b"_atom_site.", body):
            line_end = data.find(b"\n", body) % (len(data) + 1)
            tags.append(data[body + 11:line_end].strip().decode("latin-1").lower())
            body = line_end + 1
        arr = np.frombuffer(data, np.uint8)
        lines = np.concatenate(([body], (arr[body:] == 10).nonzero()[0] + body + 1))
        lines = lines[lines < len(data)]
        ends = lines[_MAY_END_LOOP[arr[lines]]]
        body_end = next((int(e) for e in ends if data[e:e + 7].lower().startswith(_CIF_END_OF_LOOP)), len(data))
        solid = arr[body:body_end] > 32
        edges = (solid[1:] != solid[:-1]).nonzero()[0] + body + 1
        if len(solid) and solid[0]:
            edges = np.concatenate(([body], edges))
        if len(solid) and solid[-1]:
            edges = np.concatenate((edges, [body_end]))
        start, end = edges[0::2], edges[1::2]
        first = arr[start]
        simple = all(" " not in t and t for t in tags) and len(start) % max(len(tags), 1) == 0
        if simple and any(data.find(c, body, body_end) >= 0 for c in _CIF_SPECIAL):
            quoted = (first == 39) | (first == 34)
            simple = not (((quoted & ((arr[end - 1] != first) | (end - start < 2))).any())
                          or np.isin(first, (35, 36, 91, 93, 95)).any()  # # $ [ ] _ cannot start a value
                          or ((first == 59) & (arr[start - 1] == 10)).any())
            start, end = start + quoted, end - quoted
        if simple:
            return _Tokens(data + b" " * 8, start, end, {t: j for j, t in enumerate(tags)},
                           lambda token: f"line {_line_of(data, int(start[token]))}")
    import gemmi  # not the simple form: let gemmi tokenise

    try:
        document = gemmi.cif.read_string(data.decode("latin-1"))
        table = document[0].find_mmcif_category("_atom_site.") if len(document) else None
    except Exception as error:
        raise StructureError(f"{path}: not a readable mmCIF file ({_first_line(error, path)}).") from None
    if table is None or len(table) == 0:
        raise StructureError(f"{path}: the file holds no atom records (no _atom_site table).")
    values = [v if gemmi.cif.is_null(v) else gemmi.cif.as_string(v).replace("\n", " ")
              for row in table for v in row]
    lengths = np.array([len(v.encode("latin-1")) for v in values], np.int64)
    end = (lengths + 1).cumsum() + 7
    text = (" " * 8 + "\n".join(values) + " " * 9).encode("latin-1")
    tags = {t.lower()[len("_atom_site."):]: j for j, t in enumerate(table.tags)}
    return _Tokens(text, end - lengths, end, tags, lambda token: f"_atom_site row {token // len(tags) + 1}")


_NULL = (_U64(0x202020202020203F), _U64(0x202020202020202E))  # '?' and '.' as words


def _cif_atoms(data: bytes, path: Path) -> _Atoms:
    tokens = _cif_tokens(data, path)
    width = len(tokens.tags)
    rows = np.arange(len(tokens.start) // width)

    def column(*names, required=True):
        """(start, end) of the first of `names` present, a null ('?' or '.') falling back to the next one."""
        found = [tokens.tags[n] for n in names if n in tokens.tags]
        if not found:
            if required:
                raise StructureError(f"{path}: the _atom_site table has no {' or '.join(names)} column.")
            return None
        s, e = tokens.start[rows * width + found[0]], tokens.end[rows * width + found[0]]
        for j in found[1:]:
            one = (e - s == 1).nonzero()[0]  # a null is one character
            if len(one):
                null = one[np.isin(np.frombuffer(tokens.text, np.uint8)[s[one]], (46, 63))]
                s, e = s.copy(), e.copy()
                s[null], e[null] = tokens.start[rows[null] * width + j], tokens.end[rows[null] * width + j]
        return s, e

    def letter(span, none):  # a one-character value: its first character, `none` when null or absent
        if span is None:
            return np.full(len(rows), none, np.uint8)
        word = tokens.words(span, 1)[0]
        return np.where((word == _NULL[0]) | (word == _NULL[1]), none, word & _U64(0xFF)).astype(np.uint8)

    model = column("pdbx_pdb_model_num", required=False)
    if model is not None and len(rows):
        words = tokens.words(model)
        rows = rows[np.logical_and.reduce([w == w[0] for w in words])]  # gemmi's first model: the first row's
    if len(rows) == 0:
        raise StructureError(f"{path}: the file holds no atom records (the _atom_site table is empty).")
    row_token = rows * width
    where = lambda i: tokens.where(int(row_token[i]))  # noqa: E731
    spans = [column(c) for c in ("cartn_x", "cartn_y", "cartn_z")]
    spans += [column(c, required=False) for c in ("occupancy", "b_iso_or_equiv")]
    spans.append(column("auth_seq_id", "label_seq_id"))
    words = np.empty((len(rows), len(spans)), np.uint64)
    for j, span in enumerate(spans):
        words[:, j] = _SPACES if span is None else tokens.number_words(span)
    text = lambda i, j: b"" if spans[j] is None else tokens.text[spans[j][0][i]:spans[j][1][i]]  # noqa: E731
    values, status = _parse_numbers(words, text)
    numbers = _check_numbers(path, where, text, values, status)
    atom_span = column("auth_atom_id", "label_atom_id")
    atom = tokens.words(atom_span, 1)[0]
    symbol = column("type_symbol", required=False)
    if symbol is not None:
        symbol = tokens.words(symbol, 1)[0]
        hydrogen = _element_of_symbol(symbol & _U64(0xFF), (symbol >> _U64(8)) & _U64(0xFF)) == 1
    else:  # no element column: names H..., D... (or 1H...) are hydrogens
        lead = atom & _U64(0xFF)
        lead = np.where((lead >= 48) & (lead <= 57), (atom >> _U64(8)) & _U64(0xFF), lead)
        hydrogen = (lead == 72) | (lead == 68)
    icode = letter(column("pdbx_pdb_ins_code", required=False), 32)
    comp = tokens.words(column("auth_comp_id", "label_comp_id"))
    ids = [column(c, required=False) for c in ("label_entity_id", "label_asym_id")]

    def entity(res, water, candidate):  # by the label_entity_id and label_asym_id of each residue's first atom
        return _cif_entity(data, *(None if span is None else tokens.distinct((span[0][res.first_in_file],
                                                                               span[1][res.first_in_file]))
                                   for span in ids), len(res.first)) == 2

    return _Atoms(chain=tokens.words(column("auth_asym_id", "label_asym_id")),
                  key=comp + tokens.words(spans[5]) + (icode,),
                  name=np.where(atom_span[1] - atom_span[0] <= 4, atom & _U64(0xFFFFFFFF), 0).astype(np.uint32),
                  altloc=letter(column("label_alt_id", required=False), 32), hydrogen=hydrogen,
                  numbers=numbers, number_status=status[:, 5],
                  number_text=lambda i: text(i, 5).decode("latin-1"), icode=icode, where=where, entity=entity,
                  merge_chain_parts=True)


def _cif_category(data: bytes, lowered: bytes, category: str, fields: Sequence[str]) -> List[List[str]]:
    """Rows of a small mmCIF category (`_entity.` ...), its text cut out and read by gemmi."""
    import gemmi

    name = category.encode()
    at = lowered.find(b"\n" + name) + 1
    if not at:
        return []
    start = data.rfind(b"\n", 0, at - 1) + 1
    start = start if lowered[start:at].strip() == b"loop_" else at
    pos, end, in_text = at, len(data), False
    while pos < len(data):  # the category ends at a line, outside text fields, starting another item or block
        if data.startswith(b";", pos):
            in_text = not in_text
        elif not in_text and lowered.startswith(_CIF_END_OF_LOOP, pos) and not lowered.startswith(name, pos):
            end = pos
            break
        pos = (data.find(b"\n", pos) + 1) or len(data)
    try:
        block = gemmi.cif.read_string("data_x\n" + data[start:end].decode("latin-1")).sole_block()
        table = block.find(category, ["?" + f for f in fields])
        return [[row.str(i) if row.has(i) else "" for i in range(len(fields))] for row in table]
    except Exception:  # a malformed side table loses only the entity types, as in gemmi's own reader
        return []


def _cif_entity(data: bytes, entity_ids, asym_ids, num_residue: int) -> np.ndarray:
    """Entity kinds of residues: the entity by `_struct_asym` (else label_entity_id), its kind by `_entity.type`;
    2 non-polymer or water, else 1.

    Args:
        entity_ids, asym_ids: (distinct values, [R] index among them) of the label_entity_id and label_asym_id
            of each residue's first atom, or None for an absent column.
    """
    lowered = data.lower()
    types = {r[0]: r[1].lower() for r in _cif_category(data, lowered, "_entity.", ["id", "type"])}
    for row in _cif_category(data, lowered, "_entity_poly.", ["entity_id"]):
        types[row[0]] = types.get(row[0]) or "polymer"
    of_asym = types and {r[0]: r[1] for r in _cif_category(data, lowered, "_struct_asym.", ["id", "entity_id"])}
    if of_asym:
        entity_ids = None if asym_ids is None else ([of_asym.get(a) for a in asym_ids[0]], asym_ids[1])
    if not types or entity_ids is None:
        return np.ones(num_residue, np.int8)
    kinds = np.array([2 if types.get(e) in ("non-polymer", "water") else 1 for e in entity_ids[0]], np.int8)
    return kinds[entity_ids[1]]
