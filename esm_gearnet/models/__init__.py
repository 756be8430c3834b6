"""Encoders (ESM, GearNet, GVP-GNN) and their fusion."""
from .esm import ESM
from .fusion import FusionNetwork, residue_one_hot
from .gearnet import GearNet
from .gvp import GVPGNN

__all__ = ["ESM", "FusionNetwork", "GearNet", "GVPGNN", "residue_one_hot"]
