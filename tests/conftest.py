"""Shared fixtures: the real data in ../shared/data (never copied into the repository)."""
import os
from pathlib import Path

import pytest

SHARED_DATA = Path(os.environ.get("ESM_GEARNET_SHARED_DATA",
                                  Path(__file__).resolve().parents[2] / "shared" / "data"))
STRUCTURES = SHARED_DATA / "structures"
ALPHAFOLD = SHARED_DATA / "alphafold"
FIDELITY = SHARED_DATA / "fidelity"


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent: these tests read the real structures in ../shared/data")
    return path


def structure_files():
    """Every real structure file (PDB and mmCIF), sorted; empty when ../shared/data is absent."""
    if not STRUCTURES.exists():
        return []
    return sorted(STRUCTURES.iterdir()) + sorted(ALPHAFOLD.iterdir())


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
