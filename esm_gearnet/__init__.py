"""esm_gearnet: protein representations from sequence (ESM-2) and structure (GearNet, GVP, CDConv) together.

The names below are imported when first used (PEP 562), so `import esm_gearnet` and `esm-gearnet COMMAND --help`
load no torch; `esm_gearnet.Protein`, `from esm_gearnet import build_task` and the subpackages work as always.
"""
import importlib
import os

# CPU threads that wait for work sleep instead of spinning, unless the user chose otherwise. With spinning (the
# OpenMP default) a run that shares its cores with another busy process slows down several times: the demo took
# 122 s instead of 21 s on 2 cores beside one other busy process (16 s with one thread). It must be set before
# torch loads its OpenMP runtime, so importing this package first (the scripts and `esm-gearnet` do) applies it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS = {
    "build_encoder": "assembly", "build_task": "assembly", "base_parser": "commands.arguments",
    "parse_args": "commands.arguments", "ConfigError": "config", "load_config": "config", "Protein": "data",
    "ProteinBatch": "data", "StructureError": "data", "load_structure": "data", "load_structures": "data",
    "Engine": "engine", "Stage": "engine", "build": "registry", "register": "registry",
}
_SUBPACKAGES = ("config", "data", "layers", "metrics", "models", "registry", "tasks")


def __getattr__(name):
    if name in _SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBPACKAGES))


__all__ = [*_SUBPACKAGES, *sorted(_EXPORTS), "__version__"]
