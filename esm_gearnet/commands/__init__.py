"""The `esm-gearnet` command and its subcommands."""
from .main import main

__all__ = ["main"]
