"""Datasets with the original config names; items are dicts {"graph": Protein, "targets": [T], ...}."""
from .demo import DemoFolds

__all__ = ["DemoFolds"]
