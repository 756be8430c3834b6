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
