"""ESM-2's architectures by name, the fair-esm `ESM2` module built from one, fair-esm's checkpoint format read
without unpickling code, and the error every weight reader raises.

The module itself is fair-esm's (`esm.model.esm2.ESM2`), so state dicts use fair-esm's names and the original's
checkpoints (`sequence_model.model.*`) load directly."""
from __future__ import annotations

import argparse
import re
import zipfile

import torch

from ...checkpoint import load_state_dict_checked, skipping_init
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
    # ESM C (EvolutionaryScale's open weights, `esmc`): 300M under the Cambrian Open License, 600M under the
    # Cambrian Non-Commercial License
    "ESM-C-300M": ("esmc_300m_2024_12_v0", 30, 960, 15),
    "ESM-C-600M": ("esmc_600m_2024_12_v0", 36, 1152, 18),
}
DEFAULT_MODEL = "ESM-2-650M"  # when `model` is omitted and no Hugging Face checkpoint is given


def family_of_stem(stem: str) -> str:
    """The model family of a weight file's stem (`ARCHITECTURES`): "ESM-2", "ESM-1b" or "ESM C"."""
    return "ESM C" if stem.startswith("esmc") else "ESM-1b" if stem.startswith("esm1") else "ESM-2"


def family_of_module(model) -> str:
    """The model family of a language model module: "ESM-2" (fair-esm's ESM2, SaProt-format models too), "ESM C"
    (`esmc.ESMC`) or "ESM-1b"."""
    return getattr(model, "family", None) or ("ESM-2" if type(model).__name__ == "ESM2" else "ESM-1b")


def family_of_name(model) -> str:
    """The model family of a config's `model:` (a name of `ARCHITECTURES` or a file stem); ESM-2 when omitted."""
    return family_of_stem(ARCHITECTURES[model][0] if model in ARCHITECTURES else str(model or "esm2"))


def language_models(state) -> dict:
    """{key prefix: "ESM-2 (33 layers, width 1280)"} for each language model whose weights a state dict holds (its
    keys are enough: a model's `state_dict()` or a checkpoint's), to name the families when a checkpoint of one is
    given to a model of another."""
    found = {}
    for key, value in state.items():
        for suffix, family in (("embed_tokens.weight", "ESM-2"), ("embed.weight", "ESM C")):
            prefix = key[:-len(suffix)]
            if not key.endswith(suffix) or (family == "ESM C") != (prefix + "transformer.norm.weight" in state):
                continue
            if prefix + "embed_positions.weight" in state:
                family = "ESM-1b"
            pattern = re.compile(re.escape(prefix) + (r"transformer\.blocks\.(\d+)\." if family == "ESM C"
                                                      else r"layers\.(\d+)\."))
            layers = 1 + max((int(m.group(1)) for m in map(pattern.match, state) if m), default=-1)
            found[prefix] = f"{family} ({layers} layers, width {value.shape[-1]})"
    return found


def show_keys(keys) -> str:
    """At most 8 state-dict keys for a message, and how many more."""
    return ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "") if keys else "none"


class WeightError(FileNotFoundError):
    """A missing or unreadable weight file; the message says where it was looked for and what to do."""


def load_esm_checkpoint(path: str) -> dict:
    """Load an official fair-esm checkpoint without unpickling arbitrary code, its tensors memory-mapped when the
    file is in torch's zip format (read whole otherwise).

    The files hold an `argparse.Namespace` (fairseq config), which `torch.load(weights_only=True)` refuses by
    default; exactly that class is allow-listed here.
    """
    with torch.serialization.safe_globals([argparse.Namespace]):
        if zipfile.is_zipfile(path):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return torch.load(path, map_location="cpu", weights_only=True)


def build_esm2(num_layers: int, embed_dim: int, attention_heads: int, token_dropout: bool = True, alphabet=None):
    """A fair-esm ESM2 module (random weights) and its alphabet (default: ESM-2's 33 tokens)."""
    import esm

    alphabet = alphabet or VOCABULARIES["ESM-2"]()
    model = esm.model.esm2.ESM2(num_layers=num_layers, embed_dim=embed_dim, attention_heads=attention_heads,
                                alphabet=alphabet, token_dropout=token_dropout)
    return model, alphabet


def esm2_from_checkpoint(model_data: dict, source: str):
    """fair-esm's ESM2 module and alphabet with the weights of a fair-esm checkpoint dict (`load_esm_checkpoint`),
    built without initialising what the weights replace (`checkpoint.skipping_init`); the state's keys checked
    strictly, as fair-esm's own loader does (its `_load_model_and_alphabet_core_v2`, whose renaming this repeats)."""
    cfg = model_data["cfg"]["model"]
    state = {re.sub(r"^(encoder\.sentence_encoder\.|encoder\.)", "", name): value
             for name, value in model_data["model"].items()}
    with skipping_init():
        model, alphabet = build_esm2(cfg.encoder_layers, cfg.encoder_embed_dim, cfg.encoder_attention_heads,
                                     token_dropout=cfg.token_dropout)
    load_state_dict_checked(model, state, source, assign=True)
    return model, alphabet
