"""`embed` at scale: a FoldComp database embedded into a folder of shards, by one process or by two ranks under
torchrun (gloo on CPU), equal to the single-file embed of the same proteins; a kill -9 resumed with two ranks or
one; a damaged entry skipped and named; the folder read back lazily (`load_embeddings`); the refusals, one
sentence each. The database repeats the three AlphaFold models of ../shared/data under 40 names."""
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ALPHAFOLD, run_command

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "config" / "demo" / "esm_gearnet.yaml"
ENTRIES = 40


def _records():
    import foldcomp

    if not ALPHAFOLD.exists():
        pytest.skip(f"{ALPHAFOLD} is absent: these tests embed a FoldComp database of its real structures")
    return [foldcomp.compress(path.name, path.read_text()) for path in sorted(ALPHAFOLD.glob("*.pdb"))]


def _write_database(path, count=ENTRIES):
    from esm_gearnet.data.io.foldcomp import write_database

    records = _records()
    return write_database(path, [(f"e{i:02d}", records[i % len(records)]) for i in range(count)])


@pytest.fixture(scope="module")
def database(tmp_path_factory):
    return _write_database(tmp_path_factory.mktemp("db") / "db")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A bare state_dict of the demo config's encoder (seeded): every process embeds with the same weights."""
    from esm_gearnet.commands.encoding import load_encoder
    from esm_gearnet.config import load_config

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "encoder.pt"
    torch.save(load_encoder(load_config(str(CONFIG))).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def reference(database, weights):
    """(names, [P, D], per-residue list): the single-file embed's `embed_proteins` on the database's proteins."""
    from esm_gearnet.commands.encoding import embed_proteins, load_encoder
    from esm_gearnet.config import load_config
    from esm_gearnet.data.datasets import FoldCompDB

    encoder = load_encoder(load_config(str(CONFIG)), torch.load(weights, weights_only=True))
    db = FoldCompDB(database)
    embedding, residue = embed_proteins(encoder, [db.protein(i) for i in range(len(db))], per_residue=True,
                                        device="cpu")
    return [db.name(i) for i in range(len(db))], embedding.numpy(), [r.numpy() for r in residue]


def _arguments(database, weights, out, *options):
    return ["-c", str(CONFIG), "--ckpt", str(weights), str(database), "-o", str(out), "--per-residue", "--quiet",
            *options]


def _embed(*argv):
    """`embed ARGV` in this process: its exit code."""
    from esm_gearnet.commands.embed import main

    return main([str(a) for a in argv])


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(key, None)
    return env


def _two_ranks(*argv, script="script/embed.py", expect=0):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script,
               *map(str, argv)]
    result = run_command(command, 300, cwd=ROOT, env=_env())
    if expect is not None:
        assert result.returncode == expect, result.stderr[-3000:]
    return result


def _assert_equal(out, names, embedding, residue):
    """The folder `out` holds exactly these rows (names in order, embeddings within 1e-5)."""
    from esm_gearnet.commands.embed import load_embeddings

    table = load_embeddings(out)
    assert table.complete and len(table) == len(names)
    assert list(table.names) == list(names)
    np.testing.assert_allclose(np.asarray(table.embeddings), embedding, atol=1e-5, rtol=1e-5)
    for i, expected in enumerate(residue):
        np.testing.assert_allclose(table.residue_embedding(i), expected, atol=1e-5, rtol=1e-5)


def _assert_same_output(out, expected):
    """The folders `out` and `expected` hold the same rows (names in order, embeddings within 1e-5)."""
    from esm_gearnet.commands.embed import load_embeddings

    theirs = load_embeddings(expected)
    _assert_equal(out, list(theirs.names), np.asarray(theirs.embeddings),
                  [theirs.residue_embedding(i) for i in range(len(theirs))])


def _files(folder):
    """{name: bytes} of every file in `folder` (what a run changed)."""
    return {path.name: path.read_bytes() for path in sorted(Path(folder).iterdir())}


@pytest.fixture(scope="module")
def one_process(database, weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "out"
    assert _embed(*_arguments(database, weights, out, "--shard-size", "8", "--workers", "1", "--device", "cpu")) == 0
    return out


def test_one_process_equals_the_single_file_embed(one_process, reference, database, weights, capsys):
    from esm_gearnet.commands.embed import load_embeddings
    from esm_gearnet.commands.shards import ShardedEmbeddings

    names, embedding, residue = reference
    _assert_equal(one_process, names, embedding, residue)
    assert sorted(p.name for p in one_process.glob("shard-*")) == [f"shard-0000{s}.npz" for s in range(5)]
    index = json.loads((one_process / "index.json").read_text())
    assert [s["entries"] for s in index["shards"]] == [[8 * s, 8 * s + 8] for s in range(5)]
    assert index["rows"] == ENTRIES and not (one_process / "skipped.tsv").exists()
    # lazily: rows by position, slice, list and name; a shard is a plain .npz too
    table = load_embeddings(one_process)
    assert isinstance(table, ShardedEmbeddings) and table.embeddings.shape == (ENTRIES, embedding.shape[1])
    np.testing.assert_allclose(table["e13"], embedding[13], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(table.embeddings[6:19], embedding[6:19], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(table.embeddings[[39, 0, 8]], embedding[[39, 0, 8]], atol=1e-5, rtol=1e-5)
    assert table.rows(["e39", "e02"]).tolist() == [39, 2] and table.names[-1] == "e39"
    assert isinstance(table._shard_arrays(0)["embedding"], np.memmap)
    with np.load(one_process / "shard-00001.npz") as shard:
        assert [n.decode() for n in shard["names"]] == names[8:16]
    # a finished output resumed: nothing to do, no file changed
    before = _files(one_process)
    assert _embed(*_arguments(database, weights, one_process, "--resume", "--device", "cpu")) == 0
    assert "embedded 0 protein(s)" in capsys.readouterr().out
    assert _files(one_process) == before
    # a folder without its index (a run still going) reads as the shards present
    partial = one_process.parent / "partial"
    shutil.copytree(one_process, partial)
    (partial / "index.json").unlink()
    (partial / "shard-00002.npz").unlink()
    table = load_embeddings(partial)
    assert not table.complete and list(table.names) == names[:16] + names[24:]
    # a damaged shard (cut short) is named in one sentence when read, and written anew by --resume
    shard = partial / "shard-00003.npz"
    shard.write_bytes(shard.read_bytes()[:3000])
    with pytest.raises(ValueError, match="shard-00003.npz cannot be read as a shard of embed"):
        load_embeddings(partial)
    assert _embed(*_arguments(database, weights, partial, "--resume", "--workers", "0", "--device", "cpu")) == 0
    _assert_equal(partial, names, embedding, residue)


def test_h5_shards_hold_the_same(database, weights, reference, tmp_path):
    pytest.importorskip("h5py")
    out = tmp_path / "h5"
    assert _embed(*_arguments(database, weights, out, "--shard-size", "16", "--format", "h5", "--workers", "0",
                              "--device", "cpu")) == 0
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-00000.h5", "shard-00001.h5", "shard-00002.h5"]
    _assert_equal(out, *reference)


def test_structure_files_shard_too(weights, tmp_path):
    """The same runner over structure files (what a run under torchrun does with them): a missing file is named
    in skipped.tsv, the others embedded as the single-file embed does."""
    from esm_gearnet.commands.embed import load_embeddings
    from esm_gearnet.commands.embed_scale import run_sharded
    from esm_gearnet.commands.encoding import embed_proteins, load_encoder
    from esm_gearnet.config import load_config
    from esm_gearnet.data import load_structures

    files = [str(path) for path in sorted(ALPHAFOLD.glob("*.pdb"))] if ALPHAFOLD.exists() else []
    if not files:
        pytest.skip(f"{ALPHAFOLD} is absent: this test embeds its real structures")
    missing = str(tmp_path / "missing.pdb")
    result = run_sharded(files + [missing], tmp_path / "out", str(CONFIG), str(weights), workers=0, device="cpu",
                         progress=False, shard_size=2)
    assert result["rows"] == 3 and result["shards"] == 2 and [n for n, _ in result["skipped"]] == [missing]
    encoder = load_encoder(load_config(str(CONFIG)), torch.load(weights, weights_only=True))
    expected, _ = embed_proteins(encoder, load_structures(files, progress=False)[0], device="cpu")
    table = load_embeddings(tmp_path / "out")
    assert list(table.names) == files
    np.testing.assert_allclose(np.asarray(table.embeddings), expected.numpy(), atol=1e-5, rtol=1e-5)
    assert (tmp_path / "out" / "skipped.tsv").read_text().startswith(f"{missing}\t")


def test_a_damaged_entry_is_skipped_and_named(weights, reference, tmp_path):
    """An entry whose index offset runs past the end of the data file: listed in skipped.tsv (and in its shard),
    the other 39 embedded."""
    from esm_gearnet.commands.embed import load_embeddings

    database = _write_database(tmp_path / "db" / "db")
    index = Path(f"{database}.index")
    lines = index.read_text().splitlines()
    key, _, size = lines[11].split("\t")
    lines[11] = f"{key}\t{database.stat().st_size + 100}\t{size}"
    index.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert _embed(*_arguments(database, weights, out, "--shard-size", "8", "--workers", "1", "--device", "cpu")) == 0
    rows = [line.split("\t") for line in (out / "skipped.tsv").read_text().splitlines()]
    assert [name for name, _ in rows] == ["e11"] and "run past the end of the data file" in rows[0][1]
    keep = [i for i in range(ENTRIES) if i != 11]
    names, embedding, residue = reference
    _assert_equal(out, [names[i] for i in keep], embedding[keep], [residue[i] for i in keep])
    assert load_embeddings(out).skipped == [tuple(rows[0])]


def test_refusals_are_one_sentence(database, weights, one_process, tmp_path, capsys):
    def refused(*argv):
        assert _embed(*argv) == 2
        error = capsys.readouterr().err
        assert error.startswith("error: ") and error.count("\n") == 1, error
        return error

    # an existing output without --resume
    error = refused(*_arguments(database, weights, one_process, "--device", "cpu"))
    assert str(one_process) in error and "add --resume" in error
    # -o naming a file (existing, or by its suffix) when the input is a database
    (tmp_path / "emb.npz").write_bytes(b"")
    for out in (tmp_path / "emb.npz", tmp_path / "new.h5"):
        error = refused(*_arguments(database, weights, out, "--device", "cpu"))
        assert f"-o {out} names a file" in error and "folder" in error
    assert not (tmp_path / "new.h5").exists()
    # --resume with another --per-residue setting, or another shard size
    argv = _arguments(database, weights, one_process, "--resume", "--device", "cpu")
    error = refused(*[a for a in argv if a != "--per-residue"])
    assert "--per-residue setting" in error
    assert "--shard-size 8, not 5" in refused(*argv, "--shard-size", "5")
    # a folder that is not an output of embed
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert "not an output of embed" in refused(*_arguments(database, weights, tmp_path / "other", "--resume"))
    # a manifest that is not embed's (valid JSON without its fields)
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "manifest.json").write_text('{"layout": 1}')
    assert "cannot be read as embed's manifest (KeyError" in refused(
        *_arguments(database, weights, tmp_path / "damaged", "--resume", "--device", "cpu"))
    # shard options with a single-file output
    assert "--shard-size and --format apply to a folder" in refused(
        "-c", CONFIG, "--ckpt", weights, ALPHAFOLD, "-o", tmp_path / "single.npz", "--shard-size", "4")


@pytest.mark.slow
def test_two_ranks_embed_every_entry_once(database, weights, one_process, reference, tmp_path):
    out = tmp_path / "two"
    result = _two_ranks(*_arguments(database, weights, out, "--shard-size", "8", "--workers", "1"))
    assert result.stdout.count("embedded 40 protein(s)") == 1  # rank 0 alone says it
    _assert_equal(out, *reference)
    _assert_same_output(out, one_process)
    assert sorted(_files(out)) == sorted(_files(one_process))


# `torchrun ... KILL_AFTER_SHARDS N R script/embed.py ARGS`: script/embed.py as usual, except that rank R SIGKILLs
# itself right after writing its N-th shard (the other rank is then ended by torchrun, wherever it is): nothing in
# esm_gearnet knows about it, the wrapper replaces the public `shards.write_shard`.
KILL_AFTER_SHARDS = """
import os, runpy, signal, sys
from esm_gearnet.commands import shards

count, rank, sys.argv = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
write, written = shards.write_shard, []

def write_then_die(path, *args, **kwargs):
    write(path, *args, **kwargs)
    written.append(path)
    if int(os.environ.get("RANK", 0)) == rank and len(written) == count:
        os.kill(os.getpid(), signal.SIGKILL)

shards.write_shard = write_then_die
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_a_killed_run_resumes_with_two_ranks_or_one(database, weights, reference, one_process, tmp_path):
    from esm_gearnet.commands.embed import load_embeddings

    wrapper = tmp_path / "kill_after_shards.py"
    wrapper.write_text(KILL_AFTER_SHARDS)
    out = tmp_path / "killed"
    argv = _arguments(database, weights, out, "--shard-size", "4", "--workers", "1")
    killed = _two_ranks(1, 1, "script/embed.py", *argv, script=str(wrapper), expect=None)
    assert killed.returncode != 0
    # rank 1 wrote shard 1 and died: its shards 3, 5, 7, 9 are missing; every shard present is whole
    assert not (out / "index.json").exists() and (out / "shard-00001.npz").is_file()
    assert not (out / "shard-00003.npz").exists()
    partial = load_embeddings(out)
    names = list(partial.names)
    assert not partial.complete and len(names) == len(set(names)) < ENTRIES
    one_rank = tmp_path / "one_rank"
    shutil.copytree(out, one_rank)
    # two ranks finish it; so does one
    _two_ranks(*argv, "--resume")
    _assert_same_output(out, one_process)
    assert _embed(*_arguments(database, weights, one_rank, "--resume", "--workers", "0", "--device", "cpu")) == 0
    _assert_same_output(one_rank, one_process)
    for folder in (out, one_rank):  # what the killed writers left is gone
        assert not [p.name for p in folder.iterdir() if p.name.startswith(".shard-")]
