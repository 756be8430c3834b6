"""Datasets with the original config names; items are dicts {"graph": Protein, "targets": [T], ...}."""
from .alphafold import AlphaFoldDB
from .atom3d import LMDBFile, MSPDataset, PSRDataset, write_lmdb
from .base import Proteins, StructureDataset
from .deepfri import EnzymeCommission, GeneOntology
from .demo import DemoFolds
from .foldcomp import FoldCompDB
from .folder import ProteinFolder

__all__ = ["AlphaFoldDB", "DemoFolds", "EnzymeCommission", "FoldCompDB", "GeneOntology", "LMDBFile", "MSPDataset",
           "PSRDataset",
           "ProteinFolder", "Proteins", "StructureDataset", "write_lmdb"]
