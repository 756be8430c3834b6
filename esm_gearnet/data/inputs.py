"""What the inputs of `embed`, `predict` and `pack` name: structure files, folders of them, text files listing
paths and (for `pack`, `archives=True`) tar archives of structure files such as AlphaFold DB's proteome tars.

`collect_inputs` turns the command line's inputs into the structure files to parse, in the order given, and
reports every input it cannot use as (input, reason) instead of stopping; the commands write those rows into
`OUT.skipped.tsv`. The rules, each in one place here:

==========================  ===================================================================================
input                       what happens
==========================  ===================================================================================
folder                      its structure files, recursively, sorted; other regular files are ignored (READMEs,
                            CSVs); a symbolic link to a folder is followed, a folder already read in this walk
                            (a link loop, a second link to it) is reported and not read again
structure file name         parsed (.pdb .ent .cif .mmcif, .gz too); the parser reports what is wrong inside
archive name (`archives`)   .tar, .tar.gz, .tgz: the archive itself, whose members the caller reads (in a
                            folder too); without `archives` an archive is an other regular file
other regular file          a list of paths: UTF-8 text, one path per line, relative to the list's folder.
                            Refused as a whole (one row naming it) when binary (a NUL byte), not UTF-8, larger
                            than `MAX_LIST_BYTES`, empty, or when none of its lines names an existing path or
                            a structure file (it is not a list); otherwise each line that names nothing is
                            one row naming its line
list already being read     a list that lists itself, directly or through other lists: reported, read once
FIFO, socket, device        reported, never opened (opening a FIFO waits for a writer forever)
missing, dangling link,     reported with the reason
link loop, unreadable
==========================  ===================================================================================
"""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from .io import STRUCTURE_SUFFIXES, is_structure_file

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
MAX_LIST_BYTES = 64 << 20  # a list of paths past 64 MiB (about a million paths) is not a list
_NOT_STRUCTURE = f"not a structure file ({', '.join(STRUCTURE_SUFFIXES)}, .gz too)"
_SPECIAL = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
            (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))

Skipped = List[Tuple[str, str]]


def is_archive(path) -> bool:
    """Whether the name of `path` is a tar archive's (`ARCHIVE_SUFFIXES`)."""
    return str(path).lower().endswith(ARCHIVE_SUFFIXES)


def collect_inputs(inputs: Sequence, archives: bool = False) -> Tuple[List[Path], Skipped]:
    """(structure files, and with `archives` tar archives, in the order given; [(input, reason)] for the inputs
    that are not used; see the module docstring for the rules). Nothing is opened but list files; a FIFO or
    device never is."""
    files: List[Path] = []
    skipped: Skipped = []
    for item in inputs:
        _collect(Path(os.path.expanduser(str(item))), files, skipped, lists=(), where="", archives=archives)
    return files, skipped


def _stat(path: Path) -> Tuple[Optional[os.stat_result], str]:
    """(the stat of what `path` names, following links, "") or (None, why it names nothing usable)."""
    try:
        return path.stat(), ""
    except OSError as error:
        if error.errno == errno.ELOOP:
            return None, "a loop of symbolic links: it names no file"
        if error.errno == errno.ENOENT and path.is_symlink():
            return None, f"a symbolic link to {os.readlink(path)}, which does not exist"
        if error.errno in (errno.ENOENT, errno.ENOTDIR):
            return None, "no such file or folder"
        return None, f"cannot be read ({error.strerror})"


def _special(mode: int) -> Optional[str]:
    return next((name for test, name in _SPECIAL if test(mode)), None)


def _collect(path: Path, files: List[Path], skipped: Skipped, lists: Tuple[str, ...], where: str,
             archives: bool) -> None:
    """Adds what `path` names to `files` or its reason to `skipped`; `where` (" (line N of LIST)") says where it
    was named and `lists` are the list files being read around it (their real paths)."""
    info, reason = _stat(path)
    if info is None:
        skipped.append((str(path), f"{path}: {reason}{where}."))
    elif stat.S_ISDIR(info.st_mode):
        _walk(path, info, files, skipped, archives)
    elif _special(info.st_mode):
        skipped.append((str(path), f"{path}: {_special(info.st_mode)}, not a file: it was not opened{where}."))
    elif is_structure_file(path) or (archives and is_archive(path)):
        files.append(path)
    else:
        _read_list(path, files, skipped, lists, where, archives)


def _walk(folder: Path, info: os.stat_result, files: List[Path], skipped: Skipped, archives: bool) -> None:
    """The structure files under `folder` (sorted, as `sorted(Path)` orders them) and the rows of the entries
    that name nothing or something that is not a file."""
    found: List[Path] = []
    seen = set()  # (device, inode) of every folder read in this walk: a link loop ends at its second visit

    def visit(directory: Path, info: os.stat_result) -> None:
        if (info.st_dev, info.st_ino) in seen:
            skipped.append((str(directory), f"{directory}: a link to the folder {os.path.realpath(directory)}, "
                                            "which was already read: a loop of links, not read again."))
            return
        seen.add((info.st_dev, info.st_ino))
        try:
            names = sorted(os.listdir(directory))
        except OSError as error:
            skipped.append((str(directory), f"{directory}: the folder cannot be listed ({error.strerror})."))
            return
        for name in names:
            path = directory / name
            entry, reason = _stat(path)
            if entry is None:
                skipped.append((str(path), f"{path}: {reason}."))
            elif stat.S_ISDIR(entry.st_mode):
                visit(path, entry)
            elif _special(entry.st_mode):
                skipped.append((str(path), f"{path}: {_special(entry.st_mode)}, not a file: it was not opened."))
            elif is_structure_file(path) or (archives and is_archive(path)):
                found.append(path)

    visit(folder, info)
    files.extend(sorted(found))


def _read_list(path: Path, files: List[Path], skipped: Skipped, lists: Tuple[str, ...], where: str,
               archives: bool) -> None:
    """The paths a list file names, each collected in turn; the whole file is one row when it is not a list."""
    def refuse(why: str) -> None:
        skipped.append((str(path), f"{path}: {_NOT_STRUCTURE} and not a list of paths: {why}{where}."))

    real = os.path.realpath(path)
    if real in lists:
        chain = " -> ".join([*lists[lists.index(real):], real])
        skipped.append((str(path), f"{path}: a list of paths already being read (a cycle of lists: {chain}); it "
                                   f"is read once{where}."))
        return
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_LIST_BYTES + 1)
    except OSError as error:
        return refuse(f"it cannot be read ({error.strerror})")
    if len(data) > MAX_LIST_BYTES:
        return refuse(f"it is larger than {MAX_LIST_BYTES >> 20} MiB")
    if b"\0" in data:
        return refuse(f"it is binary (a NUL byte at offset {data.index(0)})")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        return refuse(f"it is not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start})")
    lines = [(number, line.strip()) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        return refuse("it is empty")
    targets = [(number, Path(line) if Path(line).is_absolute() else path.parent / line) for number, line in lines]
    if not any(os.path.lexists(target) or is_structure_file(target) for _, target in targets):
        first = lines[0][1][:80]
        return refuse(f"none of its {len(lines)} line(s) names an existing file or folder (line {lines[0][0]}: "
                      f"{first!r})")
    for number, target in targets:
        _collect(target, files, skipped, (*lists, real), f" (line {number} of {path})", archives)
