"""Shared fixtures: the real data in ../shared/data (never copied into the repository), and commands run in
their own process group."""
import os
import signal
import subprocess
from pathlib import Path

import pytest

SHARED_DATA = Path(os.environ.get("ESM_GEARNET_SHARED_DATA",
                                  Path(__file__).resolve().parents[2] / "shared" / "data"))
STRUCTURES = SHARED_DATA / "structures"
ALPHAFOLD = SHARED_DATA / "alphafold"
FIDELITY = SHARED_DATA / "fidelity"


# Set by the GPU check (benchmarks/gpu_check.py) and CI: a test that would skip because ../shared/data (or its
# carried copy) is absent fails instead, so missing data never passes as green.
REQUIRE_DATA = os.environ.get("ESM_GEARNET_REQUIRE_DATA") == "1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_DATA and report.skipped and "absent" in str(report.longrepr):
        report.outcome = "failed"
        report.longrepr = f"ESM_GEARNET_REQUIRE_DATA=1 and the data is missing: {report.longrepr[-1]}"


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent: these tests read the real structures in ../shared/data")
    return path


def run_dir_of(output: Path) -> Path:
    """The one run directory a command wrote under `output` (the folder holding its config.yaml)."""
    (config,) = output.rglob("config.yaml")
    return config.parent


def run_command(command, timeout: float, **options) -> subprocess.CompletedProcess:
    """`command` run to its end (stdout and stderr captured as text), like subprocess.run, but in a session of
    its own: at the timeout its whole process group is killed (a launcher's ranks, a pool's workers, not only the
    launcher) and the test fails with the tail of its stderr. `options` go to Popen (cwd, env, ...)."""
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, **options)
    stdout, stderr = finish(process, timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def finish(process: subprocess.Popen, timeout: float):
    """(stdout, stderr) of a process started with start_new_session=True, once it ends; at the timeout its
    process group is killed with SIGKILL and the test fails with the tail of its stderr."""
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:  # the leader is gone; its group may be too
            pass
        _, stderr = process.communicate()
        pytest.fail(f"{' '.join(map(str, process.args))} did not end within {timeout:g} s; its process group was "
                    f"killed. stderr ends with:\n{(stderr or '')[-3000:]}", pytrace=False)


# `python -c KILL_BEFORE_CHECKPOINT N script.py ARGS...`: script.py run as `python script.py ARGS...`, except that
# the process SIGKILLs itself when the engine is about to write last.pth at the end of epoch N (after the epoch
# was trained, recorded and, when scored, its best.pth written; before its checkpoint): the same place in every
# run. The wrapper pattern of tests/faults/test_fault_distributed.py (which SIGSTOPs a rank), here at the engine's
# public `save`: nothing in esm_gearnet knows about it.
KILL_BEFORE_CHECKPOINT = """
import os, runpy, signal, sys
from esm_gearnet.engine import Engine

epoch, sys.argv = int(sys.argv[1]), sys.argv[2:]
save = Engine.save

def save_or_die(self, name, position=None):
    if name == "last.pth" and self.epoch == epoch:
        os.kill(os.getpid(), signal.SIGKILL)
    save(self, name, position)

Engine.save = save_or_die
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def killed_before_checkpoint(command, epoch: int, timeout: float, **options) -> subprocess.CompletedProcess:
    """`command` ([python, script, args...]) run under `KILL_BEFORE_CHECKPOINT`, to its end, as `run_command`:
    its return code is -SIGKILL when it reached the end of epoch `epoch`."""
    return run_command([command[0], "-c", KILL_BEFORE_CHECKPOINT, str(epoch), *command[1:]], timeout, **options)


def structure_files():
    """Every real structure file (PDB and mmCIF), sorted; empty when ../shared/data is absent."""
    if not STRUCTURES.exists():
        return []
    return sorted(STRUCTURES.iterdir()) + sorted(ALPHAFOLD.iterdir())


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# The tests that compare numbers run on every device at hand: "cpu" always, "cuda" (marked `cuda`) on a GPU.
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not _cuda_available(), reason="no CUDA device here: the CUDA run of this test needs a GPU (make gpu-check)")])]


@pytest.fixture(params=DEVICES)
def device(request):
    import torch

    return torch.device(request.param)


@pytest.fixture(scope="session")
def structures_dir():
    return _require(STRUCTURES)


@pytest.fixture(scope="session")
def fidelity_dir():
    return _require(FIDELITY)


@pytest.fixture(scope="session")
def all_proteins():
    """Every real structure parsed once for the session."""
    from esm_gearnet.data import load_structure

    files = structure_files()
    if not files:
        pytest.skip(f"{STRUCTURES} is absent: these tests read the real structures in ../shared/data")
    return [load_structure(f) for f in files]


def assert_every_parameter_trained(module):
    """Every parameter got a non-zero gradient, except ESM's language-model and contact heads, which are not
    part of the encoder (and are the only frozen parameters allowed)."""
    for name, parameter in module.named_parameters():
        if any(f"{head}." in f".{name}" for head in ("lm_head", "contact_head")):
            continue
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def assert_packed_equals_single(run, proteins, atol=1e-5, graph_atol=None, rtol=1e-5):
    """`run(list of proteins) -> outputs` on the packed batch equals it on each protein alone."""
    import torch

    packed = run(proteins)
    start = 0
    for b, protein in enumerate(proteins):
        single = run([protein])
        rows = slice(start, start + protein.num_residue)
        torch.testing.assert_close(single["residue_feature"], packed["residue_feature"][rows], atol=atol, rtol=rtol)
        torch.testing.assert_close(single["graph_feature"][0], packed["graph_feature"][b],
                                   atol=graph_atol or atol, rtol=rtol)
        start += protein.num_residue


def randomized_weights(model, seed=0):
    """A transformers model in eval mode with every parameter random (transformers initialises layer norms to
    1/0 and biases to 0, which would hide a weight/bias or layer-norm mix-up)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if name.endswith("word_embeddings.weight"):
                parameter.copy_(noise)
            elif parameter.dim() == 2:
                parameter.copy_(noise / parameter.shape[1] ** 0.5)
            else:
                parameter.add_(0.1 * noise)
    return model.eval()


# ---- ATOM3D-format LMDBs written from real structures ---------------------------------------------------------
ATOM3D_COLUMNS = ["ensemble", "subunit", "structure", "model", "chain", "hetero", "insertion_code", "residue",
                  "segid", "resname", "altloc", "occupancy", "bfactor", "x", "y", "z", "element", "name",
                  "fullname", "serial_number"]
PSR_TARGETS = {"T0950": "1D66-A.pdb", "T0951": "1ORC-A.pdb"}  # two CASP-like targets, three decoys each
MSP_COMPLEXES = ["2N2U-A.pdb", "6MRR-A.pdb", "1WVN-A.pdb"]


def atom_table(path, noise: float = 0.0, seed: int = 0, mutate=None):
    """The atoms of a structure file as ATOM3D's `bp_to_df` tabulates them, in DataFrame split form.

    noise: Gaussian noise (Å) on the coordinates (a decoy); mutate: (residue index, new residue name) renames
    one amino acid and drops its side chain beyond CB (a mutant as a pair needs it).
    """
    import gemmi
    import numpy as np

    structure = gemmi.read_structure(str(path))
    rng = np.random.default_rng(seed)
    rows, index = [], 0
    name = Path(path).name
    for chain in structure[0]:
        for residue_index, res in enumerate(chain):
            resname = res.name
            hetero = " " if res.het_flag == "A" else ("W" if res.name == "HOH" else f"H_{res.name}")
            if mutate is not None and residue_index == mutate[0] and hetero == " ":
                resname = mutate[1]
            for atom in res:
                if resname != res.name and atom.name not in ("N", "CA", "C", "O", "CB"):
                    continue
                x, y, z = (np.array(atom.pos.tolist()) + noise * rng.standard_normal(3)).round(6).tolist()
                rows.append([name, 0, name, 1, chain.name, hetero, res.seqid.icode.strip() or " ", res.seqid.num,
                             "    ", resname, atom.altloc if atom.altloc != "\0" else " ", atom.occ, atom.b_iso,
                             x, y, z, atom.element.name.upper(), atom.name, f" {atom.name:<3}", atom.serial])
                index += 1
    return {"columns": ATOM3D_COLUMNS, "index": list(range(index)), "data": rows}


def write_psr(root):
    """PSR-split-by-year/split-by-year/data/{train,val,test}: decoys of two targets in train, one each in val and
    test, plus one broken item (no amino acid) in train. Returns {(target, decoy): gdt_ts}."""
    from esm_gearnet.data.datasets import write_lmdb

    base = Path(root) / "PSR-split-by-year" / "split-by-year" / "data"
    scores, layout = {}, {"train": [], "val": [], "test": []}
    for t, (target, file) in enumerate(PSR_TARGETS.items()):
        for d, noise in enumerate([0.0, 0.5, 1.5, 3.0]):
            decoy = f"server{d:02d}_TS1"
            gdt = round(1.0 - noise / 4 - 0.01 * t, 3)
            scores[(target, decoy)] = gdt
            split = "train" if d < 2 else ("val" if d == 2 else "test")
            layout[split].append({"id": str((target, decoy)), "file_path": f"/casp/{target}/{decoy}.pdb",
                                  "atoms": atom_table(STRUCTURES / file, noise, seed=10 * t + d),
                                  "scores": {"rmsd": noise, "gdt_ts": gdt, "gdt_ha": gdt / 2, "tm": gdt}})
    water = {"columns": ATOM3D_COLUMNS, "index": [0], "data": [
        ["w.pdb", 0, "w.pdb", 1, "A", "W", " ", 1, "    ", "HOH", " ", 1.0, 10.0, 0.0, 0.0, 0.0, "O", "O", " O  ", 1]]}
    layout["train"].append({"id": str(("T0999", "broken")), "atoms": water, "scores": {"gdt_ts": 0.5}})
    for split, items in layout.items():
        write_lmdb(base / split, items)
    return scores


def write_msp(root):
    """MSP-split-by-sequence-identity-30/.../{train,val,test}: four single mutants of three real complexes.
    Returns {id: (label, residue index of the mutation)}."""
    from esm_gearnet.data import load_structure
    from esm_gearnet.data.datasets import write_lmdb

    base = Path(root) / "MSP-split-by-sequence-identity-30" / "split-by-sequence-identity-30" / "data"
    expected, layout = {}, {"train": [], "val": [], "test": []}
    for file, site, split, label in [("2N2U-A.pdb", 7, "train", "1"), ("6MRR-A.pdb", 18, "train", "0"),
                                     ("1WVN-A.pdb", 29, "val", "1"), ("2N2U-A.pdb", 40, "test", "0")]:
        protein = load_structure(STRUCTURES / file)
        wild = protein.sequence[site]
        new = "W" if wild != "W" else "A"
        mutation = f"{wild}{protein.chain_ids[0]}{int(protein.residue_number[site])}{new}"
        name = f"{file[:4]}_A_B_{mutation}"
        layout[split].append({"id": name, "original_atoms": atom_table(STRUCTURES / file),
                              "mutated_atoms": atom_table(STRUCTURES / file, mutate=(site, "TRP" if new == "W" else "ALA")),
                              "label": label})
        expected[name] = (label, site)
    for split, items in layout.items():
        write_lmdb(base / split, items)
    return expected


@pytest.fixture
def cli(capsys):
    """Runs `esm-gearnet ARGS...` in this process: returns (exit code, stdout, stderr)."""
    from esm_gearnet.commands.main import main

    def run(*args):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exit_:  # argparse
            code = exit_.code
        out, err = capsys.readouterr()
        return code, out, err
    return run


@pytest.fixture(autouse=True)
def _fresh_logger():
    """A command run in-process (`training.setup_logging`) gives the esm_gearnet logger its own handlers and
    stops propagation; undo that after each test so `caplog` sees the next test's records."""
    import logging

    yield
    log = logging.getLogger("esm_gearnet")
    for handler in log.handlers:
        handler.close()
    log.handlers.clear()
    log.propagate = True
    log.setLevel(logging.NOTSET)


def small(config):
    """An encoder's config (a `class:` dict) with every encoder in it made small (`Encoder.small_config`) and its
    derived sizes (input widths, GearNet's num_relation) left out for the assembly to fill in; changed in place."""
    from esm_gearnet.models import Encoder, StructureEncoder
    from esm_gearnet.registry import resolve

    cls = resolve(config["class"])
    if issubclass(cls, StructureEncoder):
        for key in filter(None, (cls.input_dim_key[0], cls.relation_key)):
            config.pop(key, None)
    config.update(cls.small_config)
    for value in config.values():
        if isinstance(value, dict) and "class" in value and issubclass(resolve(value["class"]), Encoder):
            small(value)
    return config
