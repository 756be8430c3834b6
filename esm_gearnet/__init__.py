"""esm_gearnet: protein representations from sequence (ESM-2) and structure (GearNet, GVP, CDConv) together."""
import os

# CPU threads that wait for work sleep instead of spinning, unless the user chose otherwise. With spinning (the
# OpenMP default) a run that shares its cores with another busy process slows down several times: the demo took
# 122 s instead of 21 s on 2 cores beside one other busy process (16 s with one thread). It must be set before
# torch loads its OpenMP runtime, so importing this package first (the scripts and `esm-gearnet` do) applies it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from . import config, data, layers, metrics, models, registry, tasks
from .assembly import build_encoder, build_task
from .commands.arguments import base_parser, parse_args
from .config import ConfigError, load_config
from .data import Protein, ProteinBatch, StructureError, load_structure, load_structures
from .engine import Engine, Stage
from .registry import build, register

__version__ = "0.1.0"

__all__ = ["config", "data", "layers", "metrics", "models", "registry", "tasks", "ConfigError", "Engine", "Protein",
           "ProteinBatch", "Stage", "StructureError", "base_parser", "build", "build_encoder", "build_task",
           "load_config", "load_structure", "load_structures", "parse_args", "register", "__version__"]
