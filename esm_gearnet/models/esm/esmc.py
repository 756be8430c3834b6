"""ESM C (ESM Cambrian, EvolutionaryScale 2024): the module, its weights from EvolutionaryScale's release files and
from Hugging Face folders, without the `esm` package of EvolutionaryScale (its module is also called `esm` and
cannot be installed beside fair-esm) and without `transformers`.

The module keeps the names of EvolutionaryScale's `esm.models.esmc.ESMC`, so their `.pth` files
(`esmc_300m_2024_12_v0.pth`, `esmc_600m_2024_12_v0.pth`) load as they are:

    embed                                   Embedding(64, D)
    transformer.blocks.{i}.attn.layernorm_qkv   Sequential(LayerNorm(D), Linear(D, 3 D, bias=False))
    transformer.blocks.{i}.attn.q_ln, k_ln      LayerNorm(D, bias=False) over all heads' queries / keys
    transformer.blocks.{i}.attn.out_proj        Linear(D, D, bias=False)
    transformer.blocks.{i}.ffn                  Sequential(LayerNorm(D), Linear(D, 2 F, bias=False), SwiGLU,
                                                           Linear(F, D, bias=False)), F = 8/3 D rounded up to 256
    transformer.norm                        LayerNorm(D, bias=False)
    sequence_head                           Sequential(Linear(D, D), GELU, LayerNorm(D), Linear(D, 64))

A block is x + attn(x) / s, then x + ffn(x) / s, s = sqrt(layers / 36); attention has rotary embeddings on each
head (non-interleaved halves, base 10000) after the query/key layer norms. No token dropout, no embedding scale.

A Hugging Face folder (`config.json` with `model_type: esmc`, as `transformers` writes `EsmcModel` /
`EsmcForMaskedLM`) splits the fused projections (`q_proj`, `k_proj`, `v_proj`; `gate_proj`, `up_proj`) and names
the rest otherwise (`HF_NAMES`); it is renamed onto this module (`from_hugging_face`).

Licences of the open weights (EvolutionaryScale's LICENSE.md): ESM C 300M under the Cambrian Open License
Agreement, ESM C 600M under the Cambrian Non-Commercial License Agreement; larger ESM C models are API-only.
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ...checkpoint import load_state_dict_checked, skipping_init
from .architecture import WeightError, show_keys

CONTEXT = 2048  # ESM C's training length, <cls> and <eos> included: the default window (`ESM(context=...)`)
VOCABULARY_ROWS = 64  # the embedding and the sequence head have 64 rows; the vocabulary uses 33 (see vocabularies)
# EvolutionaryScale's Hugging Face repositories of the open weights, and the file inside each
RELEASES = {
    "esmc_300m_2024_12_v0": "EvolutionaryScale/esmc-300m-2024-12",
    "esmc_600m_2024_12_v0": "EvolutionaryScale/esmc-600m-2024-12",
}
RELEASE_URL = "https://huggingface.co/{}/resolve/main/data/weights/{}.pth"


def hidden_width(dim: int) -> int:
    """F, the width of the SwiGLU feed-forward: 8/3 D rounded up to a multiple of 256 (EvolutionaryScale's
    `swiglu_correction_fn`)."""
    return int(((8 / 3 * dim) + 255) // 256 * 256)


class SwiGLU(nn.Module):
    """silu(first half) * second half of the last dimension."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The gated half.

        Args:
            x: [*, 2 F] gate then up.
        Returns:
            [*, F]
        """
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    """Multi-head self-attention with query/key layer norms over all heads and rotary embeddings."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.num_heads = heads
        self.layernorm_qkv = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 3 * dim, bias=False))
        self.out_proj = nn.Linear(dim, dim, bias=False)
        self.q_ln = nn.LayerNorm(dim, bias=False)
        self.k_ln = nn.LayerNorm(dim, bias=False)


class Block(nn.Module):
    """One ESM C transformer block; the forward paths (`attention`) call `qkv`, attention, then `out`."""

    def __init__(self, dim: int, heads: int, num_layers: int, hidden: Optional[int] = None):
        super().__init__()
        hidden = hidden or hidden_width(dim)
        self.attn = Attention(dim, heads)
        self.ffn = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * hidden, bias=False), SwiGLU(),
                                 nn.Linear(hidden, dim, bias=False))
        self.scaling_factor = math.sqrt(num_layers / 36)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Queries, keys and values of the block's attention, rotary embeddings applied.

        Args:
            x: [..., T, D] tokens.
            cos, sin: [T, 1, hd] the rotary embeddings of each token's position.
        Returns:
            q, k, v [..., T, H, hd].
        """
        attn = self.attn
        q, k, v = attn.layernorm_qkv(x).chunk(3, dim=-1)
        q, k = attn.q_ln(q).to(q.dtype), attn.k_ln(k).to(q.dtype)
        shape = (*x.shape[:-1], attn.num_heads, x.shape[-1] // attn.num_heads)
        q, k, v = q.view(shape), k.view(shape), v.view(shape)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin, v

    def out(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """The block's output: the attention's projection and residual, then the feed-forward's.

        Args:
            x: [..., T, D] the block's input.
            h: [..., T, H, hd] the attention output.
        Returns:
            [..., T, D]
        """
        x = x + self.attn.out_proj(h.reshape(x.shape)) / self.scaling_factor
        return x + self.ffn(x) / self.scaling_factor


def sequence_head(dim: int) -> nn.Sequential:
    """The language-model head (EvolutionaryScale's `RegressionHead`): Linear, GELU, LayerNorm, Linear to the 64
    vocabulary rows; never used for features."""
    return nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim), nn.Linear(dim, VOCABULARY_ROWS))


class Transformer(nn.Module):
    def __init__(self, dim: int, heads: int, num_layers: int, hidden: Optional[int] = None):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads, num_layers, hidden) for _ in range(num_layers))
        self.norm = nn.LayerNorm(dim, bias=False)


class ESMC(nn.Module):
    """ESM C's network (EvolutionaryScale's names, see the module docstring); `attention`'s forward paths run it.

    Args:
        num_layers, embed_dim, attention_heads: the architecture (300M: 30, 960, 15; 600M: 36, 1152, 18).
        hidden: the feed-forward width F (default: EvolutionaryScale's rule, `hidden_width`).
    """

    family = "ESM C"

    def __init__(self, num_layers: int, embed_dim: int, attention_heads: int, hidden: Optional[int] = None):
        super().__init__()
        if embed_dim % attention_heads or (embed_dim // attention_heads) % 2:
            raise ValueError(f"ESM C: width {embed_dim} must split into {attention_heads} heads of an even size.")
        self.num_layers, self.embed_dim, self.attention_heads = num_layers, embed_dim, attention_heads
        self.embed = nn.Embedding(VOCABULARY_ROWS, embed_dim)
        self.transformer = Transformer(embed_dim, attention_heads, num_layers, hidden)
        self.sequence_head = sequence_head(embed_dim)
        head_dim = embed_dim // attention_heads
        self.register_buffer("inv_freq", 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim)),
                             persistent=False)

    @property
    def layers(self) -> nn.ModuleList:
        return self.transformer.blocks


def architecture_of(state: Dict[str, torch.Tensor], source: str) -> Tuple[int, int, int, int]:
    """(layers, width, heads, feed-forward width) of an ESM C state dict in EvolutionaryScale's names. The number of
    heads is not in the weights: EvolutionaryScale's models all have heads of 64.

    Args:
        state: {name: tensor [that parameter's shape]}.
    """
    blocks = {int(m.group(1)) for m in map(re.compile(r"^transformer\.blocks\.(\d+)\.").match, state) if m}
    if "embed.weight" not in state or not blocks:
        raise WeightError(f"ESM C: {source} holds no ESM C weights (embed.weight, transformer.blocks.*); point "
                          "`path` at EvolutionaryScale's esmc_*.pth file's folder or a Hugging Face ESM C folder.")
    dim = state["embed.weight"].shape[1]
    hidden = state["transformer.blocks.0.ffn.3.weight"].shape[1] if "transformer.blocks.0.ffn.3.weight" in state \
        else hidden_width(dim)
    return max(blocks) + 1, dim, dim // 64, hidden


def build_esmc(num_layers: int, embed_dim: int, attention_heads: int, hidden: Optional[int] = None):
    """An ESM C module (random weights) and its vocabulary (`vocabularies`: "ESM C")."""
    from .vocabularies import VOCABULARIES

    return ESMC(num_layers, embed_dim, attention_heads, hidden), VOCABULARIES["ESM C"]()


def _from_state(state: Dict[str, torch.Tensor], source: str, heads: Optional[int] = None):
    layers, dim, default_heads, hidden = architecture_of(state, source)
    with skipping_init():  # every parameter comes from the state (checked strictly)
        model, alphabet = build_esmc(layers, dim, heads or default_heads, hidden)
    load_state_dict_checked(model, state, source, assign=True)
    return model, alphabet


def release_file(path: str, stem: str) -> str:
    """`<path>/<stem>.pth`, or `<path>/data/weights/<stem>.pth` (a download of EvolutionaryScale's Hugging Face
    repository), or one sentence saying where to download it."""
    folder = os.path.expanduser(str(path))
    for file in (os.path.join(folder, stem + ".pth"), os.path.join(folder, "data", "weights", stem + ".pth")):
        if os.path.isfile(file):
            return file
    url = RELEASE_URL.format(RELEASES.get(stem, "EvolutionaryScale/<repository>"), stem)
    raise WeightError(f"ESM C weights {stem}.pth not found in {folder}; download {url} into that folder (or set "
                      "`path:`), or set `pretrained: false` for random weights.")


def load_release(file: str):
    """ESM C module and vocabulary from one of EvolutionaryScale's `.pth` files (a bare state dict), read without
    unpickling code, memory-mapped."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # noqa: BLE001 - a damaged or non-checkpoint file: one sentence
        raise WeightError(f"{file}: not a readable ESM C weight file ({type(error).__name__}); download it "
                          "again.") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):  # a training checkpoint around it
        state = state["model"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise WeightError(f"{file}: not an ESM C state dict (EvolutionaryScale's esmc_*.pth layout).")
    return _from_state(state, file)


# ---- Hugging Face ------------------------------------------------------------------------------------------
# transformers' EsmcModel names (within `layers.{i}.`) -> ours (within `transformer.blocks.{i}.`); the fused
# projections are concatenated: q, k, v into layernorm_qkv.1, gate then up into ffn.1
HF_NAMES = {"input_layernorm.weight": "attn.layernorm_qkv.0.weight",
            "input_layernorm.bias": "attn.layernorm_qkv.0.bias",
            "self_attn.q_norm.weight": "attn.q_ln.weight", "self_attn.k_norm.weight": "attn.k_ln.weight",
            "self_attn.o_proj.weight": "attn.out_proj.weight",
            "post_attention_layernorm.weight": "ffn.0.weight", "post_attention_layernorm.bias": "ffn.0.bias",
            "mlp.down_proj.weight": "ffn.3.weight"}
HF_FUSED = {"attn.layernorm_qkv.1.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                            "self_attn.v_proj.weight"),
            "ffn.1.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight")}
HF_HEAD = {"lm_head.dense": "sequence_head.0", "lm_head.layer_norm": "sequence_head.2",
           "lm_head.decoder": "sequence_head.3"}


def check_vocabulary(folder: str, config: Dict) -> None:
    """One sentence when the folder's vocabulary is not ESM C's (`vocabularies.ESMC_TOKENS`): its special-token ids
    in config.json, and the token ids of its `tokenizer.json` when it has one (as `EsmcTokenizer` saves it)."""
    from .vocabularies import ESMC_TOKENS

    index = {token: i for i, token in enumerate(ESMC_TOKENS)}
    wrong = [f"{key} {config[key]} (ESM C: {index[token]})"
             for key, token in (("pad_token_id", "<pad>"), ("mask_token_id", "<mask>"), ("bos_token_id", "<cls>"))
             if config.get(key) is not None and config[key] != index[token]]
    file = os.path.join(folder, "tokenizer.json")
    if os.path.isfile(file):
        try:
            with open(file) as handle:
                vocabulary = json.load(handle)["model"]["vocab"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise WeightError(f"ESM C: {file} is not a tokenizer file transformers writes ({type(error).__name__}); "
                              "remove it or save the tokenizer again.") from None
        wrong += [f"{token!r} is id {vocabulary.get(token)} (ESM C: {i})" for token, i in index.items()
                  if vocabulary.get(token) != i]
    if wrong:
        raise WeightError(f"ESM C: {folder} has another vocabulary than ESM C's: {'; '.join(wrong[:4])}; point "
                          "`path` at an ESM C checkpoint of EvolutionaryScale's vocabulary.")


def check_hf_config(folder: str, config: Dict) -> None:
    """One sentence for an ESM C config.json this module cannot reproduce."""
    check_vocabulary(folder, config)
    problems = []
    for key, value in (("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu")):
        if config.get(key, value) != value:
            problems.append(f"{key} is {config[key]!r}, ESM C has {value!r}")
    heads, kv = config.get("num_attention_heads"), config.get("num_key_value_heads")
    if kv not in (None, heads):
        problems.append(f"num_key_value_heads {kv} differs from num_attention_heads {heads}")
    rope = config.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or float(rope.get("rope_theta", 10000.0)) != 10000.0:
        problems.append(f"rope_parameters are {rope}, ESM C uses the default rotary embeddings of base 10000")
    if config.get("head_dim") not in (None, config.get("hidden_size", 0) // max(heads or 1, 1)):
        problems.append(f"head_dim {config['head_dim']} is not hidden_size / num_attention_heads")
    if problems:
        raise WeightError(f"ESM C: {folder}/config.json is not an ESM C architecture: {'; '.join(problems)}.")


def from_hugging_face(state: Dict[str, torch.Tensor], folder: str, config: Dict):
    """ESM C module and vocabulary with the weights of a Hugging Face `EsmcModel` / `EsmcForMaskedLM` state dict.

    Args:
        state: {Hugging Face name: tensor [that parameter's shape]}.
        config: the folder's config.json.
    Raises:
        WeightError: missing, unexpected or mis-shaped keys, named in one sentence with the folder.
    """
    check_hf_config(folder, config)
    prefix = "esmc." if any(k.startswith("esmc.") for k in state) else ""
    ours: Dict[str, torch.Tensor] = {}
    used = set()

    def take(key):
        used.add(prefix + key)
        return state[prefix + key]

    layers = config["num_hidden_layers"]
    missing = [prefix + k for k in ("embed_tokens.weight", "norm.weight") if prefix + k not in state]
    for i in range(layers):
        for theirs, mine in HF_NAMES.items():
            key = f"layers.{i}.{theirs}"
            if prefix + key in state:
                ours[f"transformer.blocks.{i}.{mine}"] = take(key)
            else:
                missing.append(prefix + key)
        for mine, parts in HF_FUSED.items():
            keys = [f"layers.{i}.{part}" for part in parts]
            absent = [prefix + k for k in keys if prefix + k not in state]
            if absent:
                missing += absent
            else:
                ours[f"transformer.blocks.{i}.{mine}"] = torch.cat([take(k) for k in keys])
    if not missing:
        ours["embed.weight"] = take("embed_tokens.weight")
        ours["transformer.norm.weight"] = take("norm.weight")
    for theirs, mine in HF_HEAD.items():
        for p in ("weight", "bias"):
            if f"{theirs}.{p}" in state:
                ours[f"{mine}.{p}"] = state[f"{theirs}.{p}"]
                used.add(f"{theirs}.{p}")
    ignored = re.compile(r"(^|\.)rotary_emb\.(inv_freq|original_inv_freq)$|^classifier\.|^score\.")
    unexpected = [k for k in state if k not in used and not ignored.search(k)]
    if missing or unexpected:
        raise WeightError(f"ESM C: the weights in {folder} do not fit the ESM C architecture of its config.json: "
                          f"missing keys: {show_keys(missing)}; unexpected keys: {show_keys(unexpected)}.")
    dim = ours["embed.weight"].shape[1]
    if not any(k.startswith("sequence_head.") for k in ours):  # EsmcModel has no head; it is never used for
        for key, value in sequence_head(dim).state_dict().items():  # features: zeros, so loading is deterministic
            ours[f"sequence_head.{key}"] = torch.ones_like(value) if key == "2.weight" else torch.zeros_like(value)
    if ours["embed.weight"].shape[0] != VOCABULARY_ROWS:
        raise WeightError(f"ESM C: {folder} has an embedding of {ours['embed.weight'].shape[0]} rows; ESM C's "
                          f"vocabulary has {VOCABULARY_ROWS}.")
    return _from_state(ours, folder, heads=config["num_attention_heads"])
