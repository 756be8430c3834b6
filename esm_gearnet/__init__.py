"""esm_gearnet: protein representations from sequence (ESM-2) and structure (GearNet, GVP, CDConv) together."""
from . import config, data, layers, metrics, models, registry, tasks
from .config import ConfigError, load_config
from .data import Protein, ProteinBatch, StructureError, load_structure, load_structures
from .registry import build, register

__version__ = "0.1.0"

__all__ = ["config", "data", "layers", "metrics", "models", "registry", "tasks", "ConfigError", "load_config", "Protein", "ProteinBatch",
           "StructureError", "load_structure", "load_structures", "build", "register", "__version__"]
