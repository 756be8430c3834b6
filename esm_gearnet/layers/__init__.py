from . import functional
from .functional import to_packed, to_padded
from .mlp import MLP

__all__ = ["MLP", "functional", "to_packed", "to_padded"]
