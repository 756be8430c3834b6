from . import functional
from .functional import to_packed, to_padded

__all__ = ["functional", "to_packed", "to_padded"]
