"""ESM-2's architectures by name, the fair-esm `ESM2` module built from one, fair-esm's checkpoint format read
without unpickling code, and the error every weight reader raises.

The module itself is fair-esm's (`esm.model.esm2.ESM2`), so state dicts use fair-esm's names and the original's
checkpoints (`sequence_model.model.*`) load directly."""
from __future__ import annotations

import argparse

import torch

from .vocabularies import VOCABULARIES

# config name -> (checkpoint stem, layers, embedding dim, heads)
ARCHITECTURES = {
    "ESM-2-8M": ("esm2_t6_8M_UR50D", 6, 320, 20),
    "ESM-2-35M": ("esm2_t12_35M_UR50D", 12, 480, 20),
    "ESM-2-150M": ("esm2_t30_150M_UR50D", 30, 640, 20),
    "ESM-2-650M": ("esm2_t33_650M_UR50D", 33, 1280, 20),
    "ESM-2-3B": ("esm2_t36_3B_UR50D", 36, 2560, 40),
    "ESM-2-15B": ("esm2_t48_15B_UR50D", 48, 5120, 40),
    "ESM-1b": ("esm1b_t33_650M_UR50S", 33, 1280, 20),
}
DEFAULT_MODEL = "ESM-2-650M"  # when `model` is omitted and no Hugging Face checkpoint is given


class WeightError(FileNotFoundError):
    """A missing or unreadable weight file; the message says where it was looked for and what to do."""


def load_esm_checkpoint(path: str) -> dict:
    """Load an official fair-esm checkpoint without unpickling arbitrary code.

    The files hold an `argparse.Namespace` (fairseq config), which `torch.load(weights_only=True)` refuses by
    default; exactly that class is allow-listed here.
    """
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def build_esm2(num_layers: int, embed_dim: int, attention_heads: int, token_dropout: bool = True, alphabet=None):
    """A fair-esm ESM2 module (random weights) and its alphabet (default: ESM-2's 33 tokens)."""
    import esm

    alphabet = alphabet or VOCABULARIES["ESM-2"]()
    model = esm.model.esm2.ESM2(num_layers=num_layers, embed_dim=embed_dim, attention_heads=attention_heads,
                                alphabet=alphabet, token_dropout=token_dropout)
    return model, alphabet
