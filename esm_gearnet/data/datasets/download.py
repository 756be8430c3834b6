"""Dataset archives: download with an md5 check, and extraction that never writes outside its folder."""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import urllib.request
import zipfile
from pathlib import Path
from typing import Callable, Optional

logger = logging.getLogger("esm_gearnet")


class DownloadError(RuntimeError):
    """An archive that cannot be fetched, fails its checksum or tries to escape its folder."""


def md5sum(path, chunk: int = 1 << 20) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, folder, md5: str = None, name: str = None) -> Path:
    """`folder/name` (default: the URL's last part), fetched unless a file with the right md5 is there."""
    folder = Path(os.path.expanduser(str(folder)))
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / (name or url.rstrip("/").split("/")[-1])
    if target.is_file() and (md5 is None or md5sum(target) == md5):
        return target
    partial = target.with_name(target.name + ".part")
    logger.info("downloading %s to %s", url, target)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as handle:
            shutil.copyfileobj(response, handle, 1 << 20)
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise DownloadError(f"cannot download {url} ({error}); download it by hand and put it at {target}.") from None
    if md5 is not None and md5sum(partial) != md5:
        partial.unlink(missing_ok=True)
        raise DownloadError(f"{url} arrived with a wrong md5 (expected {md5}); the download was removed, try again.")
    os.replace(partial, target)
    return target


def _inside(root: Path, name: str) -> Path:
    destination = (root / name).resolve()
    if destination != root and root not in destination.parents:
        raise DownloadError(f"archive member {name!r} would be written outside {root}; the archive is refused.")
    return destination


def extract(archive, folder=None, select: Optional[Callable[[str], bool]] = None) -> Path:
    """Extract a .zip, .tar, .tar.gz or .tgz into `folder` (default: beside the archive), refusing members
    with absolute paths, `..` or links that point outside the folder. `select(name)` keeps only some members."""
    archive = Path(archive)
    root = Path(folder or archive.parent).resolve()
    root.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as handle:
            members = [m for m in handle.infolist() if select is None or select(m.filename)]
            for member in members:
                _inside(root, member.filename)
            handle.extractall(root, members=members)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as handle:
            members = [m for m in handle.getmembers() if select is None or select(m.name)]
            for member in members:
                _inside(root, member.name)
                if member.issym() or member.islnk():
                    _inside(root, str(Path(member.name).parent / member.linkname) if member.issym()
                            else member.linkname)
                if member.isdev():
                    raise DownloadError(f"archive member {member.name!r} is a device file; the archive is refused.")
            handle.extractall(root, members=members)
    else:
        raise DownloadError(f"{archive} is neither a zip nor a tar archive.")
    return root
