"""What every form of `embed` shares: the encoder loaded from a config and checkpoint, what an embedding was made
with (`embedding_options`), one batch encoded (`encode`), and proteins in memory embedded (`embed_proteins`).
The single-file command (`commands.embed`) and the sharded one (`commands.embed_scale`) both use these."""
from __future__ import annotations

import hashlib
import json
from typing import Dict, Optional

import torch

from .. import checkpoint
from ..assembly import build_encoder, model_config
from ..data import ProteinBatch
from ..engine import evaluation
from ..models import Encoder
from ..models.esm import merge_lora
from .inputs import device_of, in_input_order


def load_encoder(cfg, state: Optional[Dict] = None, source: str = "the checkpoint") -> Encoder:
    """The encoder of a config, in eval mode, with the checkpoint's encoder weights when given (then built without
    initialising them); LoRA adapters merged into their base weights (`merge_lora`: the same features, at the base
    model's cost)."""
    weights = checkpoint.encoder_state(state, source) if state is not None else None
    encoder = build_encoder(cfg, weights, source).eval()
    merge_lora(encoder)
    return encoder


def weights_digest(module: torch.nn.Module) -> str:
    """Which weights these are: `checkpoint.digest` of the module's state_dict (names, dtypes, shapes, values)."""
    return checkpoint.digest(dict(sorted(module.state_dict().items())))


def embedding_options(cfg, encoder: Encoder, per_residue: bool, precision: str = "fp32") -> str:
    """What an embedding file was made with, as JSON: the encoder's weights (sha256), its config (model and
    graph construction) and the options that change what the file holds (a precision other than fp32 named, so
    that the options of fp32 files written before it existed stay the same)."""
    model, _ = model_config(cfg)
    graph = cfg.task.get("graph_construction_model")
    config = hashlib.sha256(json.dumps([model, graph], sort_keys=True, default=str).encode()).hexdigest()
    return json.dumps({"encoder_sha256": weights_digest(encoder), "config_sha256": config,
                       "per_residue": bool(per_residue), **({"precision": precision} if precision != "fp32" else {})},
                      sort_keys=True)


def encode(encoder: Encoder, batch: ProteinBatch, per_residue: bool) -> Dict[str, torch.Tensor]:
    """One packed batch through the encoder's graph construction and encoder.

    Args:
        batch: ProteinBatch [B] of N residues.
    Returns:
        {"graph_feature": [B, D], "num_residues": [B] residues each protein keeps (those with a CA atom), and with
        `per_residue` "residue_feature": [N', D] for those residues}.
    """
    graph = encoder.construct(batch)
    output = encoder.encode(graph)
    return {"graph_feature": output["graph_feature"], "num_residues": graph.num_residues,
            **({"residue_feature": output["residue_feature"]} if per_residue else {})}


def embed_proteins(encoder: Encoder, proteins, per_residue: bool = False, device=None, max_residues: int = 4096,
                   progress: bool = False, precision: str = "fp32"):
    """([P, D] protein embeddings, per-residue [L_p, D] list or None) in the order of `proteins`; L_p counts the
    residues the encoder's graph construction keeps (all residues with a CA atom). `precision` "bf16": autocast on
    CUDA (fp32 on the CPU)."""
    device = device_of(device)
    encoder.to(device)
    values = in_input_order(lambda batch: encode(encoder, batch, per_residue), proteins,
                            [p.num_residue for p in proteins], ProteinBatch.pack, device, max_residues, progress,
                            "embedding", evaluation.autocast(device, precision))
    embedding = torch.stack([v["graph_feature"] for v in values]) if values else torch.zeros(0, encoder.output_dim)
    return embedding, ([v["residue_feature"] for v in values] if per_residue else None)


__all__ = ["embed_proteins", "embedding_options", "encode", "load_encoder", "weights_digest"]
