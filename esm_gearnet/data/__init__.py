"""Protein data: records, batches, parsing, graphs, transforms."""
from . import constants, datasets
from .graph import (AlphaCarbonNode, GraphConstruction, KNNEdge, LineGraph, SequentialEdge, SpatialEdge,
                    SpatialLineGraph)
from .io import StructureError, load_structure, load_structures
from .protein import Protein, ProteinBatch, collate
from .foldseek import THREE_DI_LETTERS, three_di, three_di_letters, three_di_states
from .transforms import Compose, Orientation, ProteinView, ResidueGraph, TruncateProtein

__all__ = [
    "constants", "datasets", "AlphaCarbonNode", "GraphConstruction", "KNNEdge", "LineGraph", "SequentialEdge", "SpatialEdge",
    "SpatialLineGraph", "StructureError", "load_structure", "load_structures", "Protein", "ProteinBatch",
    "collate", "Compose", "Orientation", "ProteinView", "ResidueGraph", "TruncateProtein", "THREE_DI_LETTERS",
    "three_di", "three_di_letters", "three_di_states",
]
