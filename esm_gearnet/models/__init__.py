"""Encoders (ESM, GearNet) and their fusion."""
from .esm import ESM
from .fusion import FusionNetwork, residue_one_hot
from .gearnet import GearNet

__all__ = ["ESM", "FusionNetwork", "GearNet", "residue_one_hot"]
