"""Dataset archives: download with an md5 check, and extraction that never writes outside its folder."""
from __future__ import annotations

import logging
import os
import shutil
import stat
import sys
import tarfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Callable, Optional

from ...checkpoint import file_hexdigest
from ...errors import UserError

logger = logging.getLogger("esm_gearnet")


class DownloadError(UserError, RuntimeError):
    """An archive that cannot be fetched, fails its checksum or tries to escape its folder."""


def md5sum(path) -> str:
    return file_hexdigest(path, "md5")


def download(url: str, folder, md5: str = None, name: str = None, resume: bool = False) -> Path:
    """`folder/name` (default: the URL's last part), fetched unless a file with the right md5 is there.

    The bytes arrive in `name.part`, renamed when complete. With `resume`, a `.part` left by an interrupted
    download is continued with an HTTP Range request (a server that ignores the range sends the whole file,
    which then replaces it): what the large FoldComp databases need (`afdb_uniprot_v4` is 1 TB).
    """
    folder = Path(os.path.expanduser(str(folder)))
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / (name or url.rstrip("/").split("/")[-1])
    if target.is_file() and (md5 is None or md5sum(target) == md5):
        return target
    partial = target.with_name(target.name + ".part")
    have = partial.stat().st_size if resume and partial.is_file() else 0
    logger.info("downloading %s to %s%s", url, target, f" (continuing after {have} bytes)" if have else "")
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            continuing = have and getattr(response, "status", 200) == 206
            with open(partial, "ab" if continuing else "wb") as handle:
                shutil.copyfileobj(response, handle, 1 << 20)
    except urllib.error.HTTPError as error:
        if not (have and error.code == 416):  # 416: nothing after the bytes already here, the .part is whole
            _refuse(url, target, partial, resume, error)
    except OSError as error:
        _refuse(url, target, partial, resume, error)
    if md5 is not None and md5sum(partial) != md5:
        partial.unlink(missing_ok=True)
        raise DownloadError(f"{url} arrived with a wrong md5 (expected {md5}); the download was removed, try again.")
    os.replace(partial, target)
    return target


def _refuse(url: str, target: Path, partial: Path, resume: bool, error: OSError) -> None:
    """A failed download: one sentence; what arrived is kept when the download can be continued."""
    if not resume:
        partial.unlink(missing_ok=True)
    again = "run it again to continue, or " if resume else ""
    raise DownloadError(f"cannot download {url} ({error}); {again}download it by hand and put it at {target}.") \
        from None


def _check(member: tarfile.TarInfo, root: Path, archive: Path) -> tarfile.TarInfo:
    """`member` as the standard library's "data" extraction filter passes it, or DownloadError.

    The filter refuses members that would land outside (`..`, below a link that leads outside), links that point
    outside, device files and FIFOs. On top of it, absolute paths (which the filter strips) and `..` components
    are refused, so that files land where the archive says; and links are refused: dataset archives hold files
    and folders only, and the filter of Pythons before 3.11.13 / 3.12.11 can be led outside through chains of
    links (CVE-2025-4517).
    """
    try:
        checked = tarfile.data_filter(member, str(root))
        if checked.name != member.name or ".." in member.name.split("/"):
            raise tarfile.FilterError(f"member {member.name!r} has an absolute path or a '..' component")
        if member.issym() or member.islnk():
            raise tarfile.FilterError(f"{member.name!r} is a {'symbolic' if member.issym() else 'hard'} link to "
                                      f"{member.linkname!r}, and dataset archives hold only files and folders")
    except tarfile.FilterError as error:
        raise DownloadError(f"{archive}: {error}; the archive is refused and nothing was extracted (fetch it "
                            "again from its source).") from None
    return checked


def _zip_as_tar(handle: zipfile.ZipFile, member: zipfile.ZipInfo) -> tarfile.TarInfo:
    """A zip member described as a tar member (name, kind, mode, link target) for `_check`."""
    info = tarfile.TarInfo(member.filename)
    mode = member.external_attr >> 16
    kinds = {stat.S_IFLNK: tarfile.SYMTYPE, stat.S_IFCHR: tarfile.CHRTYPE, stat.S_IFBLK: tarfile.BLKTYPE,
             stat.S_IFIFO: tarfile.FIFOTYPE}
    info.type = tarfile.DIRTYPE if member.is_dir() else kinds.get(stat.S_IFMT(mode), tarfile.REGTYPE)
    info.mode, info.size = stat.S_IMODE(mode) or 0o644, member.file_size
    if info.issym():  # zip keeps a link's target as the entry's content
        with handle.open(member) as entry:
            info.linkname = entry.read(4096).decode("utf-8", "replace")
    return info


def extract(archive, folder=None, select: Optional[Callable[[str], bool]] = None) -> Path:
    """Extract a .zip, .tar, .tar.gz or .tgz into `folder`, all or nothing: every selected member passes `_check`
    (the standard library's "data" filter; absolute paths and links refused) before the first is written, and
    tar members pass it again as they are written.

    DEVIATION: links in archives are refused (the original extracted archives as they came); before Python
    3.11.13 / 3.12.11 the "data" filter can be walked out of the folder through chains of links (CVE-2025-4517).

    Args:
        archive: the archive file.
        folder: where to extract (default: beside the archive); created if absent.
        select: `select(name)` keeps only some members (default: all).
    Returns:
        The folder, resolved.
    Raises:
        DownloadError: one sentence naming the archive and the refused member; nothing is extracted then.
    """
    archive = Path(archive)
    if not hasattr(tarfile, "data_filter"):
        raise DownloadError(f"extracting {archive} needs tarfile's extraction filters (Python 3.10.12+, 3.11.4+ "
                            f"or 3.12+); this is Python {sys.version.split()[0]}: upgrade Python.")
    root = Path(folder or archive.parent).resolve()
    root.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as handle:
            members = [m for m in handle.infolist() if select is None or select(m.filename)]
            for member in members:
                _check(_zip_as_tar(handle, member), root, archive)
            handle.extractall(root, members=members)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as handle:
            members = [m for m in handle.getmembers() if select is None or select(m.name)]
            for member in members:
                _check(member, root, archive)
            handle.extractall(root, members=members, filter=lambda member, _: _check(member, root, archive))
    else:
        raise DownloadError(f"{archive} is neither a zip nor a tar archive.")
    return root
