"""Encoders (ESM, GearNet, GVP-GNN, CDConv, ESM-IF1) and their fusion, all satisfying the `Encoder` contract."""
from .cdconv import CDConv
from .encoder import Encoder, StructureEncoder, residue_one_hot
from .esm import ESM
from .esm_if1 import ESMIF1
from .fusion import FusionNetwork
from .gearnet import GearNet
from .gvp import GVPGNN

__all__ = ["CDConv", "ESM", "ESMIF1", "Encoder", "FusionNetwork", "GearNet", "GVPGNN", "StructureEncoder",
           "residue_one_hot"]
