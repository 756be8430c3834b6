"""Archives whose members try to leave their folder: every refusal is one sentence naming the archive and the
member, and nothing outside the target folder (nor inside it) is created or changed.

A case is a list of members: (kind, name[, content or link target]) with kind file, dir, sym, hard, chr or fifo.
"""
import io
import stat
import tarfile
import zipfile

import pytest

from esm_gearnet.data.datasets.download import DownloadError, extract

CHAIN = [("sym", "d", "."), ("sym", "d/x", "..")]  # d -> target, d/x -> the target's parent
TAR_CASES = {
    # name: (members, the refused member as the sentence names it)
    "dotdot": ([("file", "ok.pdb"), ("file", "../evil")], "'../evil' would be extracted to"),
    "dotdot_deep": ([("dir", "a"), ("file", "a/../../evil")], "'a/../../evil' would be extracted to"),
    "dotdot_inside": ([("file", "a/../b")], "member 'a/../b' has an absolute path or a '..' component"),
    "absolute": ([("file", "{parent}/evil")], "member '{parent}/evil' has an absolute path"),
    "symlink_chain": ([*CHAIN, ("file", "x/f")], "'d' is a symbolic link to '.'"),
    "hardlink_chain": ([*CHAIN, ("hard", "h", "x/secret"), ("file", "h")], "'d' is a symbolic link to '.'"),
    "hardlink_outside": ([("hard", "h", "../secret"), ("file", "h")], "'h' would link to"),
    "hardlink_inside": ([("file", "a"), ("hard", "h", "a")], "'h' is a hard link to 'a'"),
    "symlink_outside": ([("sym", "data.pdb", "../secret")], "'data.pdb' would link to"),
    "symlink_through_dir": ([("dir", "x"), ("sym", "data.pdb", "x/../../secret")], "'data.pdb' would link to"),
    "symlink_absolute": ([("sym", "data.pdb", "{parent}/secret")], "'data.pdb' is a link to an absolute path"),
    "char_device": ([("file", "ok.pdb"), ("chr", "null")], "'null' is a special file"),
    "fifo": ([("fifo", "pipe")], "'pipe' is a special file"),
}
ZIP_CASES = {
    "dotdot": ([("file", "ok.pdb"), ("file", "../evil")], "'../evil' would be extracted to"),
    "dotdot_inside": ([("file", "a/../b")], "member 'a/../b' has an absolute path or a '..' component"),
    "absolute": ([("file", "{parent}/evil")], "member '{parent}/evil' has an absolute path"),
    "symlink_then_below": ([("sym", "d", "."), ("file", "d/x")], "'d' is a symbolic link to '.'"),
    "symlink_outside": ([("sym", "data.pdb", "../secret")], "'data.pdb' would link to"),
    "symlink_inside": ([("file", "a"), ("sym", "data.pdb", "a")], "'data.pdb' is a symbolic link to 'a'"),
    "char_device": ([("chr", "null")], "'null' is a special file"),
}
KINDS = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE, "hard": tarfile.LNKTYPE,
         "chr": tarfile.CHRTYPE, "fifo": tarfile.FIFOTYPE}


def _write_tar(path, members, mode):
    with tarfile.open(path, mode) as handle:
        for kind, name, *rest in members:
            info = tarfile.TarInfo(name)
            info.type, info.mode = KINDS[kind], 0o755 if kind == "dir" else 0o644
            data = b""
            if kind in ("sym", "hard"):
                info.linkname = rest[0]
            elif kind == "file":
                data = b"written by the archive\n"
            elif kind == "chr":
                info.devmajor, info.devminor = 1, 3
            info.size = len(data)
            handle.addfile(info, io.BytesIO(data))


def _write_zip(path, members):
    modes = {"file": stat.S_IFREG | 0o644, "dir": stat.S_IFDIR | 0o755, "sym": stat.S_IFLNK | 0o777,
             "chr": stat.S_IFCHR | 0o644}
    with zipfile.ZipFile(path, "w") as handle:
        for kind, name, *rest in members:
            info = zipfile.ZipInfo(name + ("/" if kind == "dir" else ""))
            info.external_attr = modes[kind] << 16
            handle.writestr(info, rest[0] if kind == "sym" else "" if kind == "dir" else "written by the archive\n")


def _fill(members, parent):
    """The members with {parent} in names and link targets replaced by the parent folder's path."""
    return [tuple(part.format(parent=parent) for part in member) for member in members]


def _snapshot(folder):
    """Every path under `folder`: (kind, mtime, content or link target)."""
    state = {}
    for path in sorted(folder.rglob("*")):
        info = path.lstat()
        content = (str(path.readlink()) if path.is_symlink() else path.read_bytes() if path.is_file() else None)
        state[str(path.relative_to(folder))] = (stat.S_IFMT(info.st_mode), info.st_mtime_ns, content)
    return state


@pytest.fixture
def scene(tmp_path):
    """(parent folder, empty target folder inside it): the parent holds a secret file a link chain aims at."""
    parent = tmp_path / "parent"
    (parent / "target").mkdir(parents=True)
    (parent / "secret").write_text("not for the archive\n")
    return parent, parent / "target"


def _refused(archive, target, parent, expected):
    before = _snapshot(parent)
    with pytest.raises(DownloadError) as error:
        extract(archive, target)
    assert _snapshot(parent) == before  # nothing created or changed, outside the target or in it
    sentence = str(error.value)
    assert sentence.startswith(f"{archive}: ") and expected.format(parent=parent) in sentence
    assert sentence.endswith("the archive is refused and nothing was extracted (fetch it again from its source).")


@pytest.mark.parametrize("suffix", ["tar", "tar.gz"])
@pytest.mark.parametrize("case", TAR_CASES)
def test_tar_member_leaving_its_folder_is_refused(scene, case, suffix):
    parent, target = scene
    members, expected = TAR_CASES[case]
    archive = parent / f"evil.{suffix}"
    _write_tar(archive, _fill(members, parent), "w:gz" if suffix == "tar.gz" else "w")
    _refused(archive, target, parent, expected)


@pytest.mark.parametrize("case", ZIP_CASES)
def test_zip_member_leaving_its_folder_is_refused(scene, case):
    parent, target = scene
    members, expected = ZIP_CASES[case]
    archive = parent / "evil.zip"
    _write_zip(archive, _fill(members, parent))
    _refused(archive, target, parent, expected)


@pytest.mark.parametrize("suffix", ["tar", "tar.gz", "zip"])
def test_plain_archive_extracts_and_select_skips_members(scene, suffix):
    parent, target = scene
    members = [("dir", "EC"), ("file", "EC/train/1ABC-A.pdb"), ("file", "EC/test/2XYZ-B.pdb"),
               ("file", "../not_selected")]
    archive = parent / f"data.{suffix}"
    _write_zip(archive, members) if suffix == "zip" else _write_tar(archive, members, "w:gz" if "gz" in suffix else "w")
    assert extract(archive, target, select=lambda name: name.startswith("EC/")) == target.resolve()
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*.pdb")) == ["EC/test/2XYZ-B.pdb",
                                                                                  "EC/train/1ABC-A.pdb"]
    assert (target / "EC/train/1ABC-A.pdb").read_text() == "written by the archive\n"
    assert not (parent / "not_selected").exists()


def test_python_without_extraction_filters_is_told_to_upgrade(scene, monkeypatch):
    parent, target = scene
    archive = parent / "data.tar"
    _write_tar(archive, [("file", "a.pdb")], "w")
    monkeypatch.delattr(tarfile, "data_filter")
    with pytest.raises(DownloadError, match=r"data\.tar needs tarfile's extraction filters \(Python 3\.10\.12\+, "
                                            r"3\.11\.4\+ or 3\.12\+\); this is Python [0-9.]+: upgrade Python\."):
        extract(archive, target)
    assert not (target / "a.pdb").exists()
