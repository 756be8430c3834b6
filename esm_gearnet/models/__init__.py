"""Encoders (ESM, GearNet, GVP-GNN, CDConv) and their fusion."""
from .cdconv import CDConv
from .esm import ESM
from .fusion import FusionNetwork, residue_one_hot
from .gearnet import GearNet
from .gvp import GVPGNN

__all__ = ["CDConv", "ESM", "FusionNetwork", "GearNet", "GVPGNN", "residue_one_hot"]
