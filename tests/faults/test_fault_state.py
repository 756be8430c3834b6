"""Checkpoints and caches: digests, truncation, tampering, temporary files left by a kill, and the command-line
faults on `--ckpt`, `embed -o` and `embed --resume`. Each case is a table row: what is broken, what must be said.
"""
import logging
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from esm_gearnet import checkpoint
from esm_gearnet.writing import replacing
from esm_gearnet.config import load_config
from esm_gearnet.data import load_structure
from esm_gearnet.data.datasets.cache import load_or_build
from esm_gearnet.commands.embed import save_embeddings
from esm_gearnet.commands.finetune import build_downstream
from esm_gearnet.commands.run import training_run

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "config" / "demo" / "esm_gearnet.yaml"
SMALL = {"num_protein": 20, "batch_norm": False, "num_epoch": 1, "batch_size": 8, "output_dir": None}
DEMO_ARGS = ["-c", DEMO, "--num_protein", "20", "--batch_norm", "False"]
FILES = ["1D66-A.pdb", "2N2U-A.pdb", "6MRR-A.pdb"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(run directory, engine): the demo's engine wrote last.pth (with its training state) and best.pth there."""
    folder = tmp_path_factory.mktemp("run")
    engine = build_downstream(load_config(str(DEMO), SMALL), folder, seed=0, progress=False)
    engine.save("last.pth")
    engine.save_weights("best.pth")
    return folder, engine


@pytest.fixture
def logged():
    """The messages logged by `esm_gearnet` during the test (its logger does not propagate to pytest's)."""
    messages = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())
    log = logging.getLogger("esm_gearnet")
    log.addHandler(handler)
    level, log.level = log.level, logging.INFO
    yield messages
    log.removeHandler(handler)
    log.setLevel(level)


# ---- damage done to a file ------------------------------------------------------------------------------------
def _entries(path):
    """{entry name: (offset of its bytes in the file, size)} of the zip archive torch.save writes (stored)."""
    with zipfile.ZipFile(path) as archive, open(path, "rb") as handle:
        out = {}
        for info in archive.infolist():
            handle.seek(info.header_offset + 26)
            name_length, extra_length = struct.unpack("<HH", handle.read(4))
            out[info.filename.split("/", 1)[1]] = (info.header_offset + 30 + name_length + extra_length,
                                                   info.file_size)
        return out


def _flip(path, start, count=4096):
    data = bytearray(path.read_bytes())
    for i in range(start, min(start + count, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def flip_largest_tensor(path):
    """4 KB of bits flipped in the bytes of the file's largest tensor: torch.load reads it without complaint."""
    offset, size = max((v for k, v in _entries(path).items() if k.startswith("data/")), key=lambda v: v[1])
    _flip(path, offset + size // 2 - 2048)


def flip_pickled_values(path):
    offset, size = _entries(path)["data.pkl"]
    _flip(path, offset + size // 2, 64)


def flip_middle(path):
    _flip(path, path.stat().st_size // 2)


def cut_in_half(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def empty(path):
    path.write_bytes(b"")


def _resaved(change, seal=False):
    """torch.load the file, change its dict, torch.save it (keeping its old digest) or `save_atomic` it (a new
    digest: only the structure check can tell)."""
    def damage(path):
        state = torch.load(path, weights_only=True)
        change(state)
        checkpoint.save_atomic(state, path) if seal else torch.save(state, path)
    return damage


def _set(key, value):
    return lambda state: state.__setitem__(key, value)


REFUSED = r"(does not match the digest it was written with|cannot be read safely)"


# ---- checkpoints --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage, said", [
    (flip_largest_tensor, r"does not match the digest it was written with: its content changed since"),
    (flip_pickled_values, REFUSED),
    (flip_middle, REFUSED),
    (cut_in_half, r"cannot be read safely \(.*\); it may be truncated or damaged"),
    (empty, r"is empty \(0 bytes\): it was never written completely"),
    (_resaved(_set("epoch", 7)), r"does not match the digest"),
    (_resaved(lambda s: s["encoder"].__setitem__(next(iter(s["encoder"])), next(iter(s["encoder"].values())) + 1)),
     r"does not match the digest"),
    (_resaved(lambda s: s.pop("digest")), r"has no digest, which every esm_gearnet\.checkpoint/2 file carries"),
], ids=lambda v: getattr(v, "__name__", None))
def test_a_checkpoint_that_changed_since_it_was_written_is_refused(run, tmp_path, damage, said):
    folder, engine = run
    path = tmp_path / "last.pth"
    shutil.copy(folder / "last.pth", path)
    damage(path)
    with pytest.raises(checkpoint.CheckpointError, match=rf"^checkpoint {path} {said}.*; use another checkpoint "
                                                         r"of the run \(best\.pth, last\.pth, model_epoch_N\.pth\)"):
        checkpoint.load(path)
    with pytest.raises(checkpoint.CheckpointError, match=said):
        engine.resume(path)  # training never resumes on it


def test_flipped_tensor_bits_load_without_the_digest(run, tmp_path):
    """What the digest is for: torch.load itself reads the damaged file (so the test above can fail)."""
    path = tmp_path / "last.pth"
    shutil.copy(run[0] / "last.pth", path)
    flip_largest_tensor(path)
    damaged = torch.load(path, weights_only=True)
    assert damaged["digest"] != checkpoint.digest(damaged)


def test_files_without_a_digest(run, tmp_path, logged):
    """The original's bare state_dicts load as before; this framework's files from before digests (format /1)
    load with a warning naming them."""
    folder, engine = run
    bare = tmp_path / "bare.pth"
    torch.save(engine.task.encoder.state_dict(), bare)
    state = checkpoint.encoder_state(checkpoint.load(bare), str(bare))
    assert state.keys() == engine.task.encoder.state_dict().keys() and not logged
    old = tmp_path / "old.pth"
    saved = torch.load(folder / "last.pth", weights_only=True)
    saved.pop("digest")
    torch.save({**saved, "format": "esm_gearnet.checkpoint/1"}, old)
    assert checkpoint.is_packed(checkpoint.load(old))
    assert logged == [f"checkpoint {old} was written before checkpoints carried a digest (esm_gearnet.checkpoint/1): "
                      "its content cannot be verified"]


def _pickled_code(path, marker):
    class Opens:  # unpickling it would call open(marker, "w")
        def __reduce__(self):
            return open, (str(marker), "w")
    torch.save({"encoder": {}, "x": Opens()}, path)


def test_pickled_code_never_runs(tmp_path):
    path, marker = tmp_path / "evil.pth", tmp_path / "ran"
    _pickled_code(path, marker)
    with pytest.raises(checkpoint.CheckpointError, match="cannot be read safely .*hold pickled objects"):
        checkpoint.load(path)
    assert not marker.exists()


DISTINCT = [  # pairs whose tensor bytes or printed values alone would coincide
    {"a": torch.zeros(2, dtype=torch.float32)}, {"a": torch.zeros(2, dtype=torch.int32)},
    {"a": torch.zeros(2, 3)}, {"a": torch.zeros(3, 2)}, {"a": [1, 2]}, {"a": (1, 2)}, {"a": "1"}, {"a": 1},
    {"a": 0.1}, {"a": 0.1 + 2 ** -56}, {"a": ["x", ["y"]]}, {"a": [["x"], "y"]}, {"a": None}, {"a": False},
    {"a": torch.ones(2), "b": torch.ones(1)}, {"a": torch.ones(1), "b": torch.ones(2)},
]


def test_the_digest_tells_apart_what_the_bytes_alone_would_not():
    assert len({checkpoint.digest(value) for value in DISTINCT}) == len(DISTINCT)
    assert all(checkpoint.digest(v) == checkpoint.digest({**v, "digest": "left out"}) for v in DISTINCT)


# ---- command-line faults on checkpoints -----------------------------------------------------------------------
def _zero(folder):
    (folder / "zero.pth").write_bytes(b"")
    return folder / "zero.pth"


def _list(folder):
    torch.save([1, 2, 3], folder / "list.pth")
    return folder / "list.pth"


def _tensor(folder):
    torch.save(torch.ones(3), folder / "tensor.pth")
    return folder / "tensor.pth"


def _empty_dir(folder):
    (folder / "run").mkdir()
    return folder / "run"


def _pretrain_dir(folder):
    (folder / "run").mkdir()
    torch.save({}, folder / "run" / "model_epoch_5.pth")
    return folder / "run"


EMPTY = r"error: checkpoint {ckpt} is empty \(0 bytes\): it was never written completely; use another checkpoint"
LIST = r"error: checkpoint {ckpt} holds a list, not a dict: neither a checkpoint of this framework nor a state_dict"
TENSOR = r"error: checkpoint {ckpt} holds a Tensor, not a dict"
NO_RUN = (r"error: the directory {ckpt} holds no best\.pth or last\.pth; pass a run directory that has one \(a run "
          r"writes them after its first epoch\) or a checkpoint file\.")
NO_LAST = r"error: the directory {ckpt} holds no last\.pth; pass a run directory that has one"
LISTED = r"error: the directory {ckpt} holds no best\.pth or last\.pth \(it holds model_epoch_5\.pth\); pass"


@pytest.mark.parametrize("command, make, said", [
    ("embed", _zero, EMPTY), ("predict", _zero, EMPTY), ("downstream", _zero, EMPTY),
    ("embed", _list, LIST), ("predict", _tensor, TENSOR), ("downstream", _list, LIST),
    ("embed", _empty_dir, NO_RUN), ("predict", _empty_dir, NO_RUN), ("downstream", _empty_dir, NO_RUN),
    ("predict", _pretrain_dir, LISTED), ("downstream --resume", _empty_dir, NO_LAST),
])
def test_a_bad_ckpt_is_one_sentence(cli, tmp_path, structures_dir, command, make, said):
    ckpt = make(tmp_path)
    if command in ("embed", "predict"):
        args = [command, "--ckpt", ckpt, structures_dir / FILES[0], "-o", tmp_path / f"out.{command}.npz",
                "--quiet"]
    else:
        option = "--resume" if "resume" in command else "--ckpt"
        args = ["downstream", *DEMO_ARGS, "--output_dir", tmp_path / "out", option, ckpt]
    code, out, err = cli(*args)
    error = err.splitlines()[-1]  # after downstream's log lines
    assert code == 2 and "Traceback" not in err and err.count("error:") == 1, err
    assert re.match(said.format(ckpt=re.escape(str(ckpt))), error), err


# ---- embed -o and embed --resume ------------------------------------------------------------------------------
@pytest.mark.parametrize("command, name, example", [
    ("embed", "out", "embeddings.npz"), ("embed", "out.npz", "embeddings.npz"),
    ("predict", "out.csv", "predictions.csv")])
def test_an_output_that_is_a_directory_is_refused_before_any_work(cli, tmp_path, structures_dir, command, name,
                                                                   example):
    (tmp_path / name).mkdir()
    # the checkpoint does not exist: the directory is refused before it is even looked for
    code, _, err = cli(command, "--ckpt", tmp_path / "missing.pth", structures_dir / FILES[0], "-o", tmp_path / name)
    assert code == 2 and err == (f"error: -o {tmp_path / name} is a directory; name the file to write, e.g. "
                                 f"{tmp_path / name / example}.\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def _truncated_npz(path):
    save_embeddings(path, {"ids": ["a"], "files": ["a.pdb"], "chains": ["A"], "sequences": ["MK"],
                           "embedding": torch.ones(1, 4), "options": "{}"})
    cut_in_half(path)


@pytest.mark.parametrize("name, make", [
    ("emb.npz", _truncated_npz),
    ("emb.npz", lambda path: path.write_text("ids\tembedding\n1ABC\t0.1 0.2\n")),  # not an npz
    ("emb.npz", lambda path: np.savez(path, x=np.zeros(3))),  # another npz
    ("emb.pt", lambda path: torch.save([1, 2], path)),
    ("emb.pt", lambda path: path.write_bytes(b"")),
])
def test_embed_resume_on_an_unreadable_file_changes_nothing(cli, tmp_path, structures_dir, name, make):
    config = tmp_path / "gearnet.yaml"
    config.write_text(yaml.safe_dump({"task": {"class": "PropertyPrediction", "model": {
        "class": "GearNet", "input_dim": 21, "hidden_dims": [8]}, "graph_construction_model": {
        "class": "GraphConstruction", "node_layers": [{"class": "AlphaCarbonNode"}],
        "edge_layers": [{"class": "SequentialEdge", "max_distance": 1}]}}}))
    output = tmp_path / name
    make(output)
    before = output.read_bytes()
    code, _, err = cli("embed", "-c", config, structures_dir / FILES[0], "-o", output, "--resume", "--quiet")
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: {output} cannot be read as an embedding file (") and err.endswith(
        "): it is truncated or damaged, or was not written by embed; it was left as it is: write to a new file, or "
        "leave out --resume to write it anew.\n"), err
    assert output.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["gearnet.yaml", name, f".{name}.lock"])  # the lock embed held on its output (`writing.output_lock`)


# ---- the preprocessing cache ----------------------------------------------------------------------------------
@pytest.fixture
def structures(tmp_path, structures_dir):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in FILES:
        shutil.copy(structures_dir / name, folder / name)
    return sorted(folder.iterdir())


def _drop_field(state):
    state["fields"].pop("bfactor")


def _longer_first(state):
    state["lengths"][0] += 1


def _shift_lengths(state):  # the same total, other proteins
    state["lengths"][0] += 5
    state["lengths"][1] -= 5


INCONSISTENT = r"is inconsistent \({}\); rebuilding it\."


@pytest.mark.parametrize("damage, said", [
    (flip_largest_tensor, r"does not match the digest it was written with: its content changed since .*; "
                          r"rebuilding it\."),
    (flip_middle, REFUSED + r".*; rebuilding it\."),
    (cut_in_half, r"cannot be read safely .*; rebuilding it\."),
    (empty, r"is empty \(0 bytes\): it was never written completely; rebuilding it\."),
    (_resaved(_shift_lengths), r"does not match the digest"),
    (_resaved(_drop_field), r"does not match the digest"),
    (_resaved(lambda s: s.pop("digest")), r"has no digest, which every esm_gearnet\.cache/2 file carries"),
    (_resaved(_longer_first, seal=True), INCONSISTENT.format(r"fields\.residue_type has \d+ rows but the lengths "
                                                             r"sum to \d+")),
    (_resaved(_drop_field, seal=True), INCONSISTENT.format(r"lacks fields\.bfactor")),
    (_resaved(lambda s: s.pop("files"), seal=True), INCONSISTENT.format("lacks files")),
    (_resaved(lambda s: s["names"].pop(), seal=True), INCONSISTENT.format("holds 2 names for 3 proteins")),
    (_resaved(lambda s: s["fields"].__setitem__("atom_pos", s["fields"]["atom_pos"].double()), seal=True),
     INCONSISTENT.format(r"fields\.atom_pos is not a torch\.float32 tensor of shape \[N, 14, 3\]")),
    (_resaved(lambda s: s.pop("skipped"), seal=True), INCONSISTENT.format("lacks the list of skipped files")),
], ids=lambda v: getattr(v, "__name__", None))
def test_a_damaged_cache_is_rebuilt_with_a_warning(structures, tmp_path, logged, damage, said):
    cache = tmp_path / "cache.pt"
    load_or_build(structures, cache, workers=0, progress=False)
    damage(cache)
    logged.clear()
    proteins, skipped = load_or_build(structures, cache, workers=0, progress=False)
    assert len(logged) == 1 and re.match(rf"cache {cache} {said}", logged[0]), logged
    assert logged[0].endswith("; rebuilding it."), logged
    assert len(proteins) == 3 and not skipped
    for protein, file in zip(proteins, structures):  # the right proteins, not shifted ones, no NaN
        direct = load_structure(file)
        assert protein.sequence == direct.sequence and torch.equal(protein.atom_pos, direct.atom_pos)
    logged.clear()
    load_or_build(structures, cache, workers=0, progress=False)
    assert not logged and checkpoint.load(cache)["format"] == "esm_gearnet.cache/2"  # rewritten whole


def test_a_directory_at_the_cache_path_is_one_sentence_and_kept(structures, tmp_path):
    cache = tmp_path / "cache.pt"
    cache.mkdir()
    (cache / "mine.txt").write_text("kept")
    with pytest.raises(checkpoint.CheckpointError, match=rf"^the cache path {cache} is a directory; move it away "
                                                         r"\(or delete it\) so the preprocessed cache can be written"):
        load_or_build(structures, cache, workers=0, progress=False)
    assert (cache / "mine.txt").read_text() == "kept"


# ---- temporary files left by a kill ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """A folder where a process was killed (SIGKILL) while `save_atomic` wrote last.pth, best.pth,
    model_epoch_5.pth and cache.pt: the temporary files it left, named after it."""
    folder = tmp_path_factory.mktemp("killed")
    code = ("import os, signal, sys; from contextlib import ExitStack; from esm_gearnet import writing\n"
            "with ExitStack() as stack:\n"
            "    for name in sys.argv[2:]:\n"
            "        stack.enter_context(writing.replacing(os.path.join(sys.argv[1], name))).write_bytes(b'half')\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    names = ["last.pth", "best.pth", "model_epoch_5.pth", "cache.pt"]
    result = subprocess.run([sys.executable, "-c", code, str(folder), *names],
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.returncode == -signal.SIGKILL
    left = {name: list(folder.glob(f".{name}.*")) for name in names}
    assert all(len(files) == 1 for files in left.values()), left
    return {name: files[0] for name, files in left.items()}


def test_temporary_files_of_a_killed_run_are_removed_when_it_resumes(run, killed, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(run[0], folder)
    left = [Path(shutil.copy(killed[name], folder)) for name in ("last.pth", "best.pth", "model_epoch_5.pth")]
    older = folder / ".last.pth.k2x_9abc"  # an older version's mkstemp name (no process in it)
    older.write_bytes(b"old")
    mine = folder / ".notes.abcdefgh"  # not a checkpoint's
    mine.write_text("mine")
    with replacing(folder / "last.pth") as writing:  # a live writer (this process): kept
        with training_run(["-c", str(DEMO), "--resume", str(folder)], "resume"):
            assert not any(p.exists() for p in [*left, older]) and mine.exists() and writing.exists()
        writing.write_bytes((folder / "last.pth").read_bytes())
    assert checkpoint.load(folder / "last.pth")["format"] == checkpoint.FORMAT


def test_temporary_files_of_a_killed_cache_writer_are_removed(structures, killed, tmp_path):
    left = Path(shutil.copy(killed["cache.pt"], tmp_path))
    load_or_build(structures, tmp_path / "cache.pt", workers=0, progress=False)
    assert not left.exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        ".cache.pt.lock", "cache.pt", "cache.pt.skipped.tsv", "in"]
