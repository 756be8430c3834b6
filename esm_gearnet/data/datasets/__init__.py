"""Datasets with the original config names; items are dicts {"graph": Protein, "targets": [T], ...}."""
from .base import StructureDataset
from .deepfri import EnzymeCommission, GeneOntology
from .demo import DemoFolds
from .folder import ProteinFolder

__all__ = ["DemoFolds", "EnzymeCommission", "GeneOntology", "ProteinFolder", "StructureDataset"]
