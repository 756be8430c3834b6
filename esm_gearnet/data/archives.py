"""Tar archives of structure files (AlphaFold DB's proteome tars: `AF-<UniProt>-F<n>-model_v<k>.pdb.gz` and
`.cif.gz` members beside `-confidence_v<k>.json.gz` files), read member by member: nothing is extracted to disk
and no more than one member is held in memory at a time.

Which members are read (`structure_members`, one pass over the archive's headers; for a plain `.tar` the
members' bytes are skipped with seeks, not read):

* members whose names are structure files (`io.is_structure_file`: .pdb .ent .cif .mmcif, .gz too); other
  members (confidence and PAE files, folders) are passed over without a word;
* of one model given in several formats (the same path with `.pdb.gz` and `.cif.gz`), the PDB one: it is what
  AlphaFold DB's proteome tars have always carried, and its B-factor column holds the pLDDT;
* in the archive's order.

`read_members` then yields each chosen member's bytes as stored (still gzip-compressed: the structure reader
decompresses them under its own size limit), named `ARCHIVE/MEMBER` so that errors and protein names
(`io.protein_name`: `AF-Q9XYZ1-F1-model_v4`) say where they come from.
"""
from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Callable, Container, Iterator, List, Optional, Tuple

from .io import MAX_STRUCTURE_BYTES, is_structure_file, structure_format

_FORMAT_RANK = {"pdb": 0, "cif": 1}  # lower wins when one model is given in both


class ArchiveError(ValueError):
    """A tar archive that cannot be read (damaged, truncated, not a tar); the message names it."""


def _model(name: str) -> str:
    """The member's path without its structure suffixes: the model it holds."""
    lower = name.lower()
    if lower.endswith(".gz"):
        name, lower = name[:-3], lower[:-3]
    return name[:name.rfind(".")] if "." in Path(lower).name else name


def _members(archive: Path, read: Optional[Callable[[tarfile.TarInfo], bool]] = None
             ) -> Iterator[Tuple[tarfile.TarInfo, Optional[bytes]]]:
    """(each member, its bytes when `read(member)` says so, else None) in the archive's order, without the list of
    members `tarfile` would otherwise keep (a proteome tar has up to a million and more). A failure, the reading
    of a member's bytes included, is one sentence naming the archive."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            while True:
                member = tar.next()
                if member is None:
                    return
                tar.members.clear()  # tarfile remembers every member it has read; nothing here asks for them
                yield member, (tar.extractfile(member).read() if read is not None and read(member) else None)
    except (tarfile.TarError, EOFError, OSError) as error:
        if read is not None:  # members were read from it before
            raise ArchiveError(f"{archive}: the archive cannot be read on ({error}); it is damaged or "
                               "truncated.") from None
        raise ArchiveError(f"{archive}: the archive cannot be read ({error}); it is damaged, truncated or not a "
                           "tar archive.") from None


def structure_members(archive) -> List[str]:
    """The names of the members to read (module docstring), in the archive's order.

    Raises:
        ArchiveError: one sentence naming the archive.
    """
    archive = Path(archive)
    chosen = {}  # model -> (rank, position, name)
    position = 0
    for member, _ in _members(archive):
        if not member.isfile() or not is_structure_file(member.name):
            continue
        rank = _FORMAT_RANK[structure_format(member.name)]
        model = _model(member.name)
        if model not in chosen or rank < chosen[model][0]:
            chosen[model] = (rank, position, member.name)
        position += 1
    return [name for _, _, name in sorted(chosen.values(), key=lambda item: item[1])]


def read_members(archive, wanted: Container[str]) -> Iterator[Tuple[str, Optional[bytes]]]:
    """(`ARCHIVE/MEMBER`, its bytes as stored) of the members named in `wanted`, in the archive's order; None for
    the bytes of a member larger than `MAX_STRUCTURE_BYTES` (refused from its header, never read).

    Raises:
        ArchiveError: one sentence naming the archive, when it cannot be read on (the members before were
            yielded).
    """
    archive = Path(archive)
    def asked(member) -> bool:
        return member.isfile() and member.name in wanted

    # a member larger than any real structure is refused from its header, never read into memory
    for member, data in _members(archive, read=lambda m: asked(m) and m.size <= MAX_STRUCTURE_BYTES):
        if asked(member):
            yield f"{archive}/{member.name}", data


__all__ = ["ArchiveError", "read_members", "structure_members"]
