"""ESM-2 protein language model as a residue encoder.

The weights live in fair-esm's `ESM2` module (`self.model`), so state dicts use fair-esm's names and the
original's checkpoints (`sequence_model.model.*`) load directly. They come from fair-esm's `.pt` files or from a
Hugging Face ESM-2 folder (`esm_hf`: config.json + model.safetensors / pytorch_model.bin, renamed onto
fair-esm's parameters; equal to `transformers.EsmModel` to 1e-5 in fp32, tests/test_esm_hf.py). Two forward
paths share those weights: fair-esm's own, and a fast path through `scaled_dot_product_attention` with ESM-2's
rotary embeddings (flash / memory-efficient kernels on CUDA). They agree to 1e-5 in fp32 (tests/test_models.py).
A third path, `esm2_forward_varlen`, runs the same weights on the *packed* batch (no padding tokens): all
sequences concatenated into one [T, D] sequence with cumulative sequence lengths, attention through
`torch.nn.attention.varlen.varlen_attn` (FlashAttention) on CUDA in bf16/fp16 and through one SDPA per sequence
elsewhere (tests/test_esm_varlen.py).
"""
from __future__ import annotations

import argparse
import functools
import inspect
import os
import warnings
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from ..data import constants
from ..data.protein import ProteinBatch
from ..layers import functional
from ..registry import register
from .encoder import Encoder, Features

URL = "https://dl.fbaipublicfiles.com/fair-esm/models/{}.pt"
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
MAX_RESIDUES = 1022  # ESM-2 was trained on 1024 positions, cls and eos included


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

    from .esm_hf import VOCABULARIES

    alphabet = alphabet or VOCABULARIES["ESM-2"]()
    model = esm.model.esm2.ESM2(num_layers=num_layers, embed_dim=embed_dim, attention_heads=attention_heads,
                                alphabet=alphabet, token_dropout=token_dropout)
    return model, alphabet


def _fair_esm_file(path: str, stem: str) -> str:
    """`<path>/<stem>.pt`, or one sentence saying where to download it."""
    file = os.path.join(os.path.expanduser(str(path)), stem + ".pt")
    if not os.path.isfile(file):
        url = URL.format(stem)
        raise WeightError(f"ESM weights {stem}.pt not found in {os.path.dirname(file) or '.'}; download {url} "
                          f"into that folder (or set `path:`), or set `pretrained: false` for random weights.")
    return file


def load_esm_model(path: str, stem: str):
    """Model and alphabet from `<path>/<stem>.pt` in fair-esm's format (the contact-regression file optional)."""
    import esm

    file = _fair_esm_file(path, stem)
    try:
        model_data = load_esm_checkpoint(file)
    except Exception as error:  # a damaged or non-checkpoint file
        raise WeightError(f"{file}: not a readable fair-esm checkpoint ({type(error).__name__}: "
                          f"{str(error).splitlines()[0] if str(error) else ''}); download it again from "
                          f"{URL.format(stem)}.") from None
    regression_file = os.path.join(os.path.dirname(file), stem + "-contact-regression.pt")
    regression_data = load_esm_checkpoint(regression_file) if os.path.isfile(regression_file) else None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*contact.*")
        if regression_data is None:
            # contacts are not used here: give the contact head the keys it expects so the load stays strict
            cfg = model_data["cfg"]["model"] if "cfg" in model_data else model_data["args"]
            layers = getattr(cfg, "encoder_layers", getattr(cfg, "layers", 33))
            heads = getattr(cfg, "encoder_attention_heads", getattr(cfg, "attention_heads", 20))
            regression_data = {"model": {"contact_head.regression.weight": torch.zeros(1, layers * heads),
                                         "contact_head.regression.bias": torch.zeros(1)}}
        return esm.pretrained.load_model_and_alphabet_core(stem, model_data, regression_data)


def weight_source(path: Optional[str], model: Optional[str], pretrained: bool,
                  architecture: Optional[Tuple[int, int, int]]) -> Tuple[str, Optional[str], Optional[str]]:
    """Where the weights of `ESM(path, model, pretrained, architecture)` come from, found without reading them:
    ("random", fair-esm model name or None for `architecture`, None), ("hugging face", folder, None) or
    ("fair-esm", folder, file stem). Raises the constructor's one sentence for weights that are not there (also
    called when a config is checked, before anything is built or downloaded)."""
    if architecture is not None:
        if pretrained:
            raise ValueError("ESM: `architecture` builds random weights; set `pretrained: false` with it.")
        return "random", None, None
    if pretrained and _reads_hugging_face(path, model):
        return "hugging face", path, None
    if model is None and pretrained and path is not None:
        stem = ARCHITECTURES[DEFAULT_MODEL][0]
        folder = os.path.expanduser(str(path))
        if not os.path.isdir(folder):
            raise WeightError(f"ESM: the folder {folder} given as `path` does not exist; point `path` at a "
                              "Hugging Face ESM checkpoint folder or a folder of fair-esm .pt files.")
        if not os.path.isfile(os.path.join(folder, stem + ".pt")):
            raise WeightError(f"ESM: {folder} holds neither a Hugging Face ESM checkpoint (config.json) nor "
                              f"{stem}.pt, the fair-esm file of the default `model: {DEFAULT_MODEL}`; point "
                              f"`path` at a folder with one of them (download {URL.format(stem)}), or set "
                              "`pretrained: false` for random weights.")
        return "fair-esm", path, stem
    model = DEFAULT_MODEL if model is None else model
    if model in ARCHITECTURES or not pretrained:
        if model not in ARCHITECTURES:
            raise ValueError(f"ESM: unknown model {model!r}; choose one of {', '.join(ARCHITECTURES)}.")
        stem = ARCHITECTURES[model][0]
        if not pretrained:
            if model == "ESM-1b":
                raise ValueError("ESM: random weights are built for ESM-2 models only; use an ESM-2 name.")
            return "random", model, None
        if path is None:
            raise WeightError(f"ESM: no `path` given for the {model} weights; set `path:` to the folder "
                              f"holding {stem}.pt (download {URL.format(stem)}) or to a Hugging Face ESM "
                              "checkpoint folder, or `pretrained: false`.")
    else:
        if path is None:
            raise WeightError(f"ESM: no `path` given for the checkpoint {model!r}.")
        stem = model
    _fair_esm_file(path, stem)
    return "fair-esm", path, stem


def _reads_hugging_face(path: Optional[str], model: Optional[str]) -> bool:
    """Whether `ESM(path, model)` loads a Hugging Face checkpoint: `path` holds config.json and `model` does not
    name a fair-esm file there (fair-esm files keep working exactly as before)."""
    from .esm_hf import is_hf_folder

    if not is_hf_folder(path):
        return False
    if model is None:
        return True
    stem = ARCHITECTURES[model][0] if model in ARCHITECTURES else model
    return not os.path.isfile(os.path.join(os.path.expanduser(str(path)), stem + ".pt"))


def _load_hugging_face(path: str, model: Optional[str]):
    """fair-esm ESM2 module and alphabet from a Hugging Face ESM folder; `model`, if given, must name its
    architecture."""
    from .esm_hf import load_hf_esm

    folder = os.path.expanduser(str(path))
    esm_model, alphabet, config = load_hf_esm(folder)
    if model is not None:
        shape = (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"])
        names = [name for name, (_, *dims) in ARCHITECTURES.items() if tuple(dims) == shape and "ESM-2" in name]
        if model not in names:
            found = f"{shape[0]} layers, width {shape[1]}, {shape[2]} heads"
            if model in ARCHITECTURES:
                what = f"is another architecture than the Hugging Face checkpoint in {folder} ({found})"
            else:
                what = f"names no file {model}.pt in {folder}, which holds a Hugging Face checkpoint ({found})"
            fix = f"set `model: {names[0]}` or remove it" if names else "remove `model:`"
            raise WeightError(f"ESM: `model: {model}` {what}; {fix} (config.json decides the architecture).")
    return esm_model, alphabet


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rotary(length: int, inv_freq: torch.Tensor, dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    t = torch.arange(length, device=inv_freq.device, dtype=inv_freq.dtype)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _qkv(layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Queries, keys and values [..., T, H, hd] of one ESM-2 layer for tokens x [..., T, D], rotary embeddings
    applied (`cos`, `sin` [T, 1, hd]: each token's position)."""
    attn = layer.self_attn
    shape = (*x.shape[:-1], attn.num_heads, x.shape[-1] // attn.num_heads)
    h = layer.self_attn_layer_norm(x)
    q, k, v = (projection(h).view(shape) for projection in (attn.q_proj, attn.k_proj, attn.v_proj))
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin, v


def _layer_out(layer, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The layer's output from its input x [..., T, D] and the attention output h [..., T, H, hd]: the output
    projection, the residual, then the feed-forward with its residual."""
    x = x + layer.self_attn.out_proj(h.reshape(x.shape))
    return x + layer.fc2(F.gelu(layer.fc1(layer.final_layer_norm(x))))


def _sdpa_layer(layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """One ESM-2 transformer layer on padded tokens x [B, T, D] (pre-norm attention with rotary embeddings,
    then the feed-forward)."""
    q, k, v = (t.transpose(1, 2) for t in _qkv(layer, x, cos, sin))  # [B, H, T, hd]
    h = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    return _layer_out(layer, x, h.transpose(1, 2))


def esm2_forward_sdpa(model, tokens: torch.Tensor, repr_layer: int, padding_idx: int, mask_idx: int,
                      checkpoint: bool = False, layer_fn=_sdpa_layer) -> torch.Tensor:
    """ESM-2 representations of layer `repr_layer` through `scaled_dot_product_attention`.

    Args:
        model: a fair-esm `ESM2` (its weights are used as they are).
        tokens: [B, T] token ids, `<cls>` ... `<eos>` then padding.
        checkpoint: recompute each layer's activations in the backward pass instead of keeping them
            (activation checkpointing: memory per layer drops to its input, for one extra forward).
        layer_fn: the function computing one layer (`_sdpa_layer`, or a `torch.compile`d version of it).
    Returns:
        [B, T, D]; the last layer's output goes through `emb_layer_norm_after`, as in fair-esm.
    """
    padding = tokens.eq(padding_idx)  # [B, T]
    x = model.embed_scale * model.embed_tokens(tokens)
    if model.token_dropout:
        is_mask = tokens.eq(mask_idx)
        x = x.masked_fill(is_mask.unsqueeze(-1), 0.0)
        mask_ratio_train = 0.15 * 0.8
        lengths = (~padding).sum(-1)
        mask_ratio_observed = is_mask.sum(-1).to(x.dtype) / lengths
        x = x * (1 - mask_ratio_train) / (1 - mask_ratio_observed)[:, None, None]
    x = x * (~padding).unsqueeze(-1).to(x.dtype)
    attn_mask = None if not padding.any() else (~padding)[:, None, None, :]
    cos = sin = None
    if repr_layer:
        cos, sin = (t.unsqueeze(1) for t in _rotary(tokens.shape[1], model.layers[0].self_attn.rot_emb.inv_freq,
                                                    x.dtype))  # [T, 1, hd]
    return _run_layers(model, x, repr_layer, checkpoint, layer_fn, cos, sin, attn_mask)


def _run_layers(model, x: torch.Tensor, repr_layer: int, checkpoint: bool, layer_fn, *layer_args) -> torch.Tensor:
    """x through the first `repr_layer` layers (`layer_fn(layer, x, *layer_args)`, recomputed in the backward
    pass with `checkpoint`), then `emb_layer_norm_after` when that is the last layer, as in fair-esm."""
    checkpoint = checkpoint and torch.is_grad_enabled()
    for layer in model.layers[:repr_layer]:
        if checkpoint:
            x = torch.utils.checkpoint.checkpoint(layer_fn, layer, x, *layer_args, use_reentrant=False)
        else:
            x = layer_fn(layer, x, *layer_args)
    if repr_layer == len(model.layers):
        x = model.emb_layer_norm_after(x)
    return x


@functools.lru_cache(maxsize=None)
def _varlen_kernel():
    """`torch.nn.attention.varlen.varlen_attn`, or None where this torch lacks it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@functools.lru_cache(maxsize=None)
def _flash_capable(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (8, 0)  # FlashAttention 2: Ampere and newer


def varlen_kernel_dtype(q: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype in which `varlen_attention` runs FlashAttention's variable-length kernel on `q` [T, H, hd], or
    None when it runs the reference instead. The kernel runs on a CUDA GPU of compute capability 8.0 or newer,
    in bf16/fp16 (q's own dtype, else the active CUDA autocast dtype), head size a multiple of 8 up to 256, with
    a torch that has `varlen_attn`. fp32 without autocast runs the reference, exact in fp32 (FlashAttention has
    no fp32 kernel, and a silent cast to bf16 would change the numbers a fp32 run asked for)."""
    if not q.is_cuda or q.shape[-1] % 8 or q.shape[-1] > 256 or _varlen_kernel() is None:
        return None
    if not _flash_capable(q.device.index if q.device.index is not None else torch.cuda.current_device()):
        return None
    half = (torch.float16, torch.bfloat16)
    if q.dtype in half:
        return q.dtype
    if torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") in half:
        return torch.get_autocast_dtype("cuda")
    return None


def uses_varlen_kernel(q: torch.Tensor) -> bool:
    """Whether `varlen_attention` runs FlashAttention's variable-length kernel on `q` (see `varlen_kernel_dtype`)."""
    return varlen_kernel_dtype(q) is not None


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int,
                     lengths: Tuple[int, ...]) -> torch.Tensor:
    """Bidirectional attention of each packed sequence over itself only.

    Args:
        q, k, v: [T, H, hd] the tokens of all sequences, one after the other (rotary embeddings applied).
        cu_seqlens: [S + 1] int32, sequence s holds tokens cu_seqlens[s] .. cu_seqlens[s + 1] - 1.
        max_len: the longest sequence; lengths: the S sequence lengths (host ints).
    Returns:
        [T, H, hd]. On CUDA in bf16/fp16 (see `varlen_kernel_dtype`) FlashAttention's variable-length kernel,
        under autocast in the autocast dtype (autocast does not reach this custom op, so the cast is made here).
        Otherwise the reference: `scaled_dot_product_attention` on each sequence alone, so no FLOP goes to
        padding and the result equals the padded path's to rounding.
    """
    dtype = varlen_kernel_dtype(q)
    if dtype is not None:
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        return _varlen_kernel()(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len)
    # [1, H, L_s, hd] per sequence: 4-d inputs reach the fused kernels (3-d ones fall back to the math path on CPU)
    outputs = [F.scaled_dot_product_attention(*(t.transpose(0, 1).unsqueeze(0) for t in (qs, ks, vs)))
               for qs, ks, vs in zip(q.split(lengths), k.split(lengths), v.split(lengths))]
    return torch.cat(outputs, dim=2)[0].transpose(0, 1)


def varlen_layer_fn(compile: bool = False):
    """The function computing one ESM-2 layer on packed tokens: `fn(layer, x [T, D], cos, sin [T, 1, hd] at
    each token's position within its own sequence, cu_seqlens, max_len, lengths) -> [T, D]`.

    With `compile`, the dense parts before and after attention go through `torch.compile`; attention stays
    outside, so the compiled graphs never see the number or lengths of the sequences and do not recompile for
    every new batch composition.
    """
    qkv, out = (torch.compile(_qkv, dynamic=True), torch.compile(_layer_out, dynamic=True)) if compile \
        else (_qkv, _layer_out)

    def layer_fn(layer, x, cos, sin, cu_seqlens, max_len, lengths):
        q, k, v = qkv(layer, x, cos, sin)
        return out(layer, x, varlen_attention(q, k, v, cu_seqlens, max_len, lengths))

    return layer_fn


_varlen_layer = varlen_layer_fn()


def esm2_forward_varlen(model, tokens: torch.Tensor, cu_seqlens: torch.Tensor, repr_layer: int, mask_idx: int,
                        checkpoint: bool = False, layer_fn=_varlen_layer) -> torch.Tensor:
    """ESM-2 representations of layer `repr_layer` on packed sequences, no padding anywhere.

    Equal to `esm2_forward_sdpa` on the padded batch of the same sequences, row for row: rotary embeddings
    take each token's position within its own sequence (restarting at every `<cls>`), and token dropout
    rescales each sequence by its own length and `<mask>` count, as fair-esm does per row.

    Args:
        model: a fair-esm `ESM2`.
        tokens: [T] token ids of S sequences one after the other, each `<cls>` ... `<eos>`.
        cu_seqlens: [S + 1] int32 cumulative sequence lengths (0, L_1, L_1 + L_2, ..., T).
        checkpoint, layer_fn: as in `esm2_forward_sdpa` (`layer_fn`: `_varlen_layer` or its compiled version).
    Returns:
        [T, D]; the last layer's output goes through `emb_layer_norm_after`, as in fair-esm.
    """
    lengths_tensor = cu_seqlens.diff().long()  # [S]
    lengths = tuple(lengths_tensor.tolist())
    max_len = max(lengths, default=0)
    sequence = torch.repeat_interleave(torch.arange(len(lengths), device=tokens.device), lengths_tensor)  # [T]
    position = torch.arange(len(tokens), device=tokens.device) - cu_seqlens[:-1].long()[sequence]  # [T]
    x = model.embed_scale * model.embed_tokens(tokens)
    if model.token_dropout:
        is_mask = tokens.eq(mask_idx)
        x = x.masked_fill(is_mask.unsqueeze(-1), 0.0)
        mask_ratio_train = 0.15 * 0.8
        count = torch.zeros_like(lengths_tensor).index_add_(0, sequence, is_mask.long())
        mask_ratio_observed = count.to(x.dtype) / lengths_tensor
        x = x * (1 - mask_ratio_train) / (1 - mask_ratio_observed)[sequence, None]
    cos = sin = None
    if repr_layer:
        cos, sin = _rotary(max_len, model.layers[0].self_attn.rot_emb.inv_freq, x.dtype)
        cos, sin = cos[position].unsqueeze(1), sin[position].unsqueeze(1)  # [T, 1, hd]
    return _run_layers(model, x, repr_layer, checkpoint, layer_fn, cos, sin, cu_seqlens.to(torch.int32), max_len,
                       lengths)


@register
class ESM(Encoder):
    """ESM protein language model over the residues of a ProteinBatch.

    Args:
        path: folder of the official fair-esm weight files (`esm2_t33_650M_UR50D.pt`, ...), or of a Hugging Face
            ESM checkpoint (`config.json` with `model_type: esm`, and `model.safetensors` or `pytorch_model.bin`,
            as `save_pretrained` writes `EsmModel` / `EsmForMaskedLM`, e.g. facebook/esm2_t33_650M_UR50D); see
            `esm_hf`. Neither needs network access or unpickles code; `transformers` is not needed.
        model: ESM-2-8M, -35M, -150M, -650M, -3B, -15B or ESM-1b; or a checkpoint file stem in `path`.
            How `model` and `path` decide what is loaded (pretrained weights):
            - `model` given and `path/<its stem>.pt` exists: that fair-esm file, exactly as without Hugging Face.
            - otherwise, `path` holds `config.json`: the Hugging Face checkpoint; its config.json decides the
              architecture, and `model`, when given, must be the ESM-2 name of that architecture (a check).
            - otherwise the fair-esm file of `model`, ESM-2-650M when `model` is omitted.
            With `pretrained: false`, `path` is not read: `model` (default ESM-2-650M) or `architecture` decides.
        readout: "mean" or "sum" over residues (special tokens excluded).
        pretrained: False builds the architecture with random weights (no file needed; ESM-2 names only).
        repr_layer: layer whose output is the residue feature (default: the last).
        attention: "sdpa" (fast path, padded batch), "esm" (fair-esm's own forward) or "varlen" (ESM-2 only):
            the unpadded path. Every protein (each 1022-residue window of a long one) becomes its own
            `<cls>` ... `<eos>` sequence, all concatenated into one [T, D] token sequence with cumulative
            sequence lengths, so no FLOP is spent on padding and length buckets are optional. Rotary positions
            restart in every sequence; token dropout rescales each by its own length and `<mask>` count.
            On a CUDA GPU (Ampere or newer) under bf16/fp16 (autocast or half weights) attention runs
            FlashAttention's variable-length kernel (`torch.nn.attention.varlen.varlen_attn`, in recent torch).
            In fp32, on CPU, without that module or with a head size the kernel lacks, it runs one
            `scaled_dot_product_attention` per sequence instead: exact fp32, since FlashAttention has no fp32
            kernel (fp32 inputs are never silently cast to bf16). Equal to "sdpa" to
            1e-5 in fp32 (tests/test_esm_varlen.py). Works with activation checkpointing, compile (the dense
            parts of each layer; attention stays outside the compiled graphs) and the feature cache.
        architecture: (num_layers, embed_dim, heads) for a custom random-weight ESM-2 (pretrained False).
        activation_checkpointing: recompute each layer in the backward pass instead of storing its activations
            (less memory for long proteins and big models, about one more forward of time; sdpa and varlen).
        feature_cache_gib: host memory (GiB) for the residue features of a *frozen* ESM (`freeze`, which
            `fix_sequence_model` or `sequence_model_lr_ratio: 0` call). Each protein's features are then computed
            once and reused, keyed by the exact residue sequence fed to ESM: a crop or mutation that changes
            the sequence is a new entry, never a wrong hit. Proteins are added until the budget is full.
            Masked residues (pre-training) bypass the cache. 0 turns it off.
        compile: run each transformer layer through `torch.compile` (dynamic shapes; sdpa and varlen). The first
            batches pay the compilation (tens of seconds); on CPU it needs a C++ compiler.
        vocabulary: "ESM-2" or "SaProt" (SaProt's 446 structure-aware tokens). With `pretrained: false`, the
            vocabulary of the random model (default ESM-2); pretrained models take theirs from their files, and
            `vocabulary`, when given, is a check that they have it (so a config can name it and still build with
            random weights when shrunk).
        plddt_mask: SaProt-format models only: replace the 3Di letter by `#` where the residue's pLDDT
            (`Protein.bfactor`, the CA B-factor, which AlphaFold DB files fill with pLDDT) is below
            `plddt_threshold`, as SaProt does for AlphaFold structures. Nothing in a parsed protein says whether
            its B-factors are pLDDT, so this is an option: true for AlphaFold / ESMFold models, false (default)
            for experimental structures, whose B-factors are not confidences (SaProt's own "auto" looks for
            the word "alphafold" in the file, which a parsed protein no longer has).
        plddt_threshold: pLDDT below which the structure is masked (SaProt: 70).
        graph_construction_model: optional (ESM reads the sequence only; a node layer such as AlphaCarbonNode
            still decides which residues it sees).
    `encode(graph, residue_mask)`: `residue_mask` [N] bool (optional) marks residues that get ESM's `<mask>`
    token. Returns residue_feature [N, D] and graph_feature [B, D].

    **SaProt-format models** (a checkpoint whose vocabulary is SaProt's amino-acid x 3Di tokens, `esm_hf`) read
    the structure too: residue i becomes the token `<amino acid><3Di letter in lower case>` (`Md`, `Ev`, ...).
    The 3Di states are `Protein.three_di_state` when the dataset kept them (`three_di: true`), else computed
    from the batch's backbone atoms (`data.three_di_states`, every chain of every protein on its own). Rules:
    - a residue without a 3Di state (chain ends, missing backbone atoms; see `data.foldseek`) gets `d`, the
      letter Foldseek writes there and hence the one in SaProt's training data;
    - with `plddt_mask`, residues of pLDDT below `plddt_threshold` get `#` for their structure;
    - a masked residue (`residue_mask`, pre-training) gets `#` for its amino acid and keeps its 3Di letter
      (`#d`): SaProt's mask of the amino acid (its paper; its zero-shot mutation scoring writes the same
      token). `<mask>` (the whole token) is not used, so ESM-2's token dropout does not apply to it. The
      letter kept is that of the structure before masking: the pre-training objectives' `mask_residues`
      removes the side chains (CB, which 3Di reads) but computes the states first (`reads_three_di`);
    - an unknown amino acid gets `<unk>`, as SaProt's tokenizer gives for Foldseek's `X`.
    The feature cache of a frozen model keys on these tokens (amino acids and 3Di), so two proteins of one
    sequence and different structures never share features.

    DEVIATION: proteins longer than 1022 residues were truncated by the original, which then failed in
    serial fusion (fewer ESM features than residues). Here they are cut into consecutive windows of at most
    1022 residues, each run with its own `<cls>`/`<eos>`, so every residue gets a feature (a warning says so).
    """

    group = "sequence_model"
    small_config = {"pretrained": False, "architecture": [1, 32, 4]}

    @classmethod
    def check_config(cls, arguments: Dict[str, Any]) -> None:
        """Before anything is built (`registry.check`): the weights the arguments name are there."""
        given = {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
                 if p.default is not p.empty}
        given.update(arguments)
        weight_source(given["path"], given["model"], given["pretrained"], given["architecture"])

    def __init__(self, path: Optional[str] = None, model: Optional[str] = None, readout: str = "mean",
                 pretrained: bool = True, repr_layer: Optional[int] = None, attention: str = "sdpa",
                 architecture: Optional[Tuple[int, int, int]] = None, activation_checkpointing: bool = False,
                 feature_cache_gib: float = 0.0, compile: bool = False, vocabulary: Optional[str] = None,
                 plddt_mask: bool = False, plddt_threshold: float = 70.0,
                 graph_construction_model: Optional[nn.Module] = None):
        super().__init__(graph_construction_model)
        if readout not in ("mean", "sum"):
            raise ValueError(f"ESM: readout must be 'mean' or 'sum', got {readout!r}.")
        if attention not in ("sdpa", "esm", "varlen"):
            raise ValueError(f"ESM: attention must be 'sdpa', 'esm' or 'varlen', got {attention!r}.")
        for option, value in (("activation_checkpointing", activation_checkpointing), ("compile", compile)):
            if value and attention == "esm":
                raise ValueError(f"ESM: {option} works on the sdpa and varlen paths; set `attention: sdpa`.")
        from .esm_hf import VOCABULARIES, is_saprot

        if vocabulary is not None and vocabulary not in VOCABULARIES:
            raise ValueError(f"ESM: unknown vocabulary {vocabulary!r}; choose one of {', '.join(VOCABULARIES)}.")
        random_alphabet = VOCABULARIES[vocabulary]() if vocabulary is not None and not pretrained else None
        kind, where, stem = weight_source(path, model, pretrained, architecture)
        if kind == "random":
            esm_model, alphabet = build_esm2(*(architecture or ARCHITECTURES[where][1:]), alphabet=random_alphabet)
        elif kind == "hugging face":
            esm_model, alphabet = _load_hugging_face(where, model)
        else:
            esm_model, alphabet = load_esm_model(where, stem)
        if vocabulary is not None and list(alphabet.all_toks) != list(VOCABULARIES[vocabulary]().all_toks):
            raise WeightError(f"ESM: `vocabulary: {vocabulary}` was asked for, but the weights loaded from {path} "
                              f"have another vocabulary ({len(alphabet.all_toks)} tokens); point `path` at a "
                              f"{vocabulary} checkpoint or remove `vocabulary:`.")
        self.model = esm_model
        self.alphabet = alphabet
        self.readout = readout
        self.attention = attention
        self.is_esm2 = type(esm_model).__name__ == "ESM2"
        if (activation_checkpointing or compile) and not self.is_esm2:
            raise ValueError("ESM: activation_checkpointing and compile are built for ESM-2 models; remove them "
                             "for ESM-1b.")
        if attention == "varlen" and not self.is_esm2:
            raise ValueError("ESM: `attention: varlen` is built for ESM-2 models; use `attention: esm` for ESM-1b.")
        self.activation_checkpointing = activation_checkpointing
        if attention == "varlen":
            self._layer_fn = varlen_layer_fn(compile)
        else:
            self._layer_fn = torch.compile(_sdpa_layer, dynamic=True) if compile else _sdpa_layer
        self.feature_cache_gib = float(feature_cache_gib)
        self._cache: Dict[bytes, torch.Tensor] = {}  # residue types (uint8 bytes) -> [L, D] on the CPU
        self._cache_bytes = 0
        num_layers = esm_model.num_layers
        self.repr_layer = num_layers if repr_layer is None else repr_layer
        if not 0 <= self.repr_layer <= num_layers:
            raise ValueError(f"ESM: repr_layer must be within 0..{num_layers}, got {repr_layer}.")
        self.output_dim = esm_model.embed_dim
        # the language-model and contact heads are never used for features: frozen, so DDP finds no unused
        # parameters (lm_head.weight is the token embedding itself, which stays trainable)
        shared = {id(p) for p in esm_model.embed_tokens.parameters()}
        for head in ("lm_head", "contact_head"):
            for parameter in getattr(esm_model, head).parameters() if hasattr(esm_model, head) else ():
                if id(parameter) not in shared:
                    parameter.requires_grad_(False)
        self.register_buffer("mapping", self._mapping(alphabet), persistent=False)
        self.saprot = self.reads_three_di = is_saprot(alphabet)
        self.plddt_mask = bool(plddt_mask)
        self.plddt_threshold = float(plddt_threshold)
        if self.saprot:
            self.register_buffer("saprot_mapping", self._saprot_mapping(alphabet), persistent=False)

    @staticmethod
    def _mapping(alphabet) -> torch.Tensor:
        """Token id of each residue type; unknown -> `<unk>`."""
        tokens = [alphabet.get_idx(c) for c in constants.RESIDUE_LETTERS] + [alphabet.unk_idx]
        return torch.tensor(tokens, dtype=torch.long)

    @staticmethod
    def _saprot_mapping(alphabet) -> torch.Tensor:
        """[22, 21] token id of (residue row, structure column): rows the residue types, unknown (`<unk>`) and a
        masked amino acid (`#`); columns the 3Di states 0..19 and masked structure (`#`)."""
        from ..data.foldseek import THREE_DI_LETTERS

        structure = [c.lower() for c in THREE_DI_LETTERS] + ["#"]
        rows = [[alphabet.get_idx(a + s) for s in structure] for a in constants.RESIDUE_LETTERS + "#"]
        rows.insert(constants.NUM_RESIDUE_TYPES, [alphabet.unk_idx] * len(structure))
        return torch.tensor(rows, dtype=torch.long)

    def structure_tokens(self, batch: ProteinBatch) -> Optional[torch.Tensor]:
        """[N] long: the structure column of each residue's SaProt token (3Di state 0..19, 20 for `#`), or None
        for a model of another vocabulary. See the class docstring for the rules."""
        if not self.saprot:
            return None
        from ..data import foldseek

        states = batch.three_di_state
        if states is None:  # not kept by the dataset: from the backbone, each chain of each protein on its own
            states = foldseek.batch_states(batch)
        states = states.to(batch.residue_type.device).long()
        # a residue without a state reads as Foldseek's placeholder D, as in SaProt's training data
        states = states.masked_fill(states.eq(foldseek.NO_STATE),
                                    foldseek.THREE_DI_LETTERS.index(foldseek.FOLDSEEK_PLACEHOLDER))
        if self.plddt_mask:
            states = states.masked_fill(batch.bfactor.to(states.device) < self.plddt_threshold, foldseek.NUM_STATES)
        return states

    def token_strings(self, batch: ProteinBatch, residue_mask: Optional[torch.Tensor] = None):
        """Each protein's tokens as one string (SaProt: `MdEvVp...`; ESM-2: its residue letters; special
        tokens as written, e.g. `<unk>`), without `<cls>` / `<eos>`."""
        ids = self._token_ids(batch.residue_type, residue_mask, self.structure_tokens(batch))
        return ["".join(self.alphabet.all_toks[i] for i in chunk.tolist())
                for chunk in ids.split(batch.num_residues.tolist())]

    def _token_ids(self, residue_type: torch.Tensor, residue_mask: Optional[torch.Tensor] = None,
                   structure: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[N] token id of each packed residue (`structure` [N]: SaProt's structure column, see
        `structure_tokens`)."""
        if self.saprot:
            if structure is None:
                raise ValueError("ESM: a SaProt-format model needs each residue's 3Di state (`structure_tokens`).")
            rows = residue_type.long()
            if residue_mask is not None:  # SaProt masks the amino acid and keeps the structure: `#d`
                rows = rows.masked_fill(residue_mask, constants.NUM_RESIDUE_TYPES + 1)
            return self.saprot_mapping[rows, structure.long()]
        ids = self.mapping[residue_type]
        if residue_mask is not None:
            ids = ids.masked_fill(residue_mask, self.alphabet.mask_idx)
        return ids

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The original saved a `mapping` buffer (unknown residues -> -1, which ESM cannot embed). It must agree
        # with ours on the 20 amino acids; ours is kept.
        key = prefix + "mapping"
        if key in state_dict:
            theirs = state_dict.pop(key)
            if not torch.equal(theirs[:constants.NUM_RESIDUE_TYPES].cpu(), self.mapping[:constants.NUM_RESIDUE_TYPES].cpu()):
                raise ValueError(f"{key}: the checkpoint maps residues to ESM tokens in another order than this "
                                 "framework (G A S P V T C I L N D Q K E M H F R Y W); it cannot be loaded as is.")
        self.clear_cache()  # cached features belong to the old weights
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def tokenize(self, batch: ProteinBatch, residue_mask: Optional[torch.Tensor] = None):
        """Padded ESM tokens of the batch, long proteins split into windows of at most 1022 residues.

        Returns:
            tokens [W, T], and the (window row, column) of every packed residue ([N], [N]).
        """
        return self._tokenize(batch.residue_type, batch.num_residues, residue_mask, self.structure_tokens(batch))

    def _windows(self, residue_type: torch.Tensor, num_residues: torch.Tensor,
                 residue_mask: Optional[torch.Tensor] = None, structure: Optional[torch.Tensor] = None):
        """Token ids [N] of the packed residues, their window [N] and column within it [N] (`<cls>` is column
        0), and the residues of each window [W]."""
        alphabet = self.alphabet
        ids = self._token_ids(residue_type, residue_mask, structure)
        position = functional.position_in_segment(num_residues)
        windows_per_protein = (num_residues + MAX_RESIDUES - 1) // MAX_RESIDUES
        if bool((num_residues > MAX_RESIDUES).any()):
            warnings.warn(f"ESM: proteins longer than {MAX_RESIDUES} residues are embedded in windows of "
                          f"{MAX_RESIDUES} residues.", stacklevel=5)
        residue2graph = functional.segment_ids(num_residues)
        window = functional.offsets(windows_per_protein)[residue2graph] + position // MAX_RESIDUES
        column = position % MAX_RESIDUES + int(alphabet.prepend_bos)
        num_windows = int(windows_per_protein.sum())
        window_length = torch.bincount(window, minlength=num_windows)
        return ids, window, column, window_length

    def tokenize_packed(self, batch: ProteinBatch, residue_mask: Optional[torch.Tensor] = None):
        """Unpadded ESM tokens of the batch (`attention: varlen`): every window of at most 1022 residues its own
        `<cls>` ... `<eos>` sequence, all sequences one after the other.

        Returns:
            tokens [T], cu_seqlens [W + 1] (sequence w holds tokens cu_seqlens[w] .. cu_seqlens[w + 1] - 1) and
            the token of every packed residue [N].
        """
        return self._tokenize_packed(batch.residue_type, batch.num_residues, residue_mask,
                                     self.structure_tokens(batch))

    def _tokenize_packed(self, residue_type: torch.Tensor, num_residues: torch.Tensor,
                         residue_mask: Optional[torch.Tensor] = None, structure: Optional[torch.Tensor] = None):
        alphabet = self.alphabet
        ids, window, column, window_length = self._windows(residue_type, num_residues, residue_mask, structure)
        bos, eos = int(alphabet.prepend_bos), int(alphabet.append_eos)
        sequence_length = window_length + bos + eos  # [W]
        cu_seqlens = torch.zeros(len(window_length) + 1, dtype=torch.long, device=ids.device)
        cu_seqlens[1:] = torch.cumsum(sequence_length, 0)
        start = cu_seqlens[:-1]
        tokens = ids.new_full((int(cu_seqlens[-1]),), alphabet.padding_idx)  # every entry is overwritten below
        token = start[window] + column
        tokens[token] = ids
        if bos:
            tokens[start] = alphabet.cls_idx
        if eos:
            tokens[start + window_length + bos] = alphabet.eos_idx
        return tokens, cu_seqlens, token

    def _tokenize(self, residue_type: torch.Tensor, num_residues: torch.Tensor,
                  residue_mask: Optional[torch.Tensor] = None, structure: Optional[torch.Tensor] = None):
        alphabet = self.alphabet
        ids, window, column, window_length = self._windows(residue_type, num_residues, residue_mask, structure)
        num_windows = len(window_length)
        length = int(window_length.max()) + int(alphabet.prepend_bos) + int(alphabet.append_eos) if num_windows else 0
        tokens = ids.new_full((num_windows, length), alphabet.padding_idx)
        tokens[window, column] = ids
        rows = torch.arange(num_windows, device=ids.device)
        if alphabet.prepend_bos:
            tokens[:, 0] = alphabet.cls_idx
        if alphabet.append_eos:
            tokens[rows, window_length + int(alphabet.prepend_bos)] = alphabet.eos_idx
        return tokens, window, column

    def _features(self, residue_type: torch.Tensor, num_residues: torch.Tensor,
                  residue_mask: Optional[torch.Tensor] = None, structure: Optional[torch.Tensor] = None
                  ) -> torch.Tensor:
        """[N, D] residue features of packed proteins (`structure`: SaProt's structure column, see
        `structure_tokens`)."""
        if self.attention == "varlen":
            tokens, cu_seqlens, token = self._tokenize_packed(residue_type, num_residues, residue_mask, structure)
            hidden = esm2_forward_varlen(self.model, tokens, cu_seqlens, self.repr_layer, self.alphabet.mask_idx,
                                         checkpoint=self.activation_checkpointing, layer_fn=self._layer_fn)
            return hidden[token]
        tokens, window, column = self._tokenize(residue_type, num_residues, residue_mask, structure)
        if self.attention == "sdpa" and self.is_esm2:
            hidden = esm2_forward_sdpa(self.model, tokens, self.repr_layer, self.alphabet.padding_idx,
                                       self.alphabet.mask_idx, checkpoint=self.activation_checkpointing,
                                       layer_fn=self._layer_fn)
        else:
            hidden = self.model(tokens, repr_layers=[self.repr_layer])["representations"][self.repr_layer]
        return hidden[window, column]

    def _cached_features(self, batch: ProteinBatch) -> torch.Tensor:
        """Features of a frozen ESM-2, computed only for the proteins not cached yet (in one batch)."""
        sizes = batch.num_residues.tolist()
        structure = self.structure_tokens(batch)
        # the key is the token of every residue: residue types, and for SaProt-format models their 3Di letters
        key_tensor = batch.residue_type if structure is None else self._token_ids(batch.residue_type, None, structure)
        key_dtype = torch.uint8 if structure is None else torch.int16
        keys = [chunk.numpy().tobytes() for chunk in key_tensor.to("cpu", key_dtype).split(sizes)]
        missing = [i for i, key in enumerate(keys) if key not in self._cache]
        fresh: Dict[bytes, torch.Tensor] = {}
        if missing:
            chosen = torch.zeros(batch.batch_size, dtype=torch.bool, device=batch.residue_type.device)
            chosen[missing] = True
            residues = chosen[batch.residue2graph]
            computed = self._features(batch.residue_type[residues], batch.num_residues[chosen], None,
                                      None if structure is None else structure[residues])
            for i, feature in zip(missing, computed.split([sizes[i] for i in missing])):
                fresh[keys[i]] = feature
                size = feature.numel() * feature.element_size()
                if keys[i] not in self._cache and self._cache_bytes + size <= self.feature_cache_gib * 2 ** 30:
                    self._cache[keys[i]] = feature.to("cpu", copy=True)
                    self._cache_bytes += size
        device = batch.residue_type.device
        return torch.cat([fresh[key] if key in fresh else self._cache[key].to(device, non_blocking=True)
                          for key in keys])

    def clear_cache(self) -> None:
        self._cache.clear()
        self._cache_bytes = 0

    def encode(self, batch: ProteinBatch, residue_mask: Optional[torch.Tensor] = None) -> Features:
        if self.group not in self.frozen:
            residue_feature = self._features(batch.residue_type, batch.num_residues, residue_mask,
                                             self.structure_tokens(batch))
        else:  # no gradient reaches a frozen ESM: keep no activations for one
            with torch.no_grad():
                if self.feature_cache_gib > 0 and residue_mask is None and self.is_esm2 and batch.batch_size:
                    residue_feature = self._cached_features(batch)
                else:
                    residue_feature = self._features(batch.residue_type, batch.num_residues, residue_mask,
                                                     self.structure_tokens(batch))
        return {"residue_feature": residue_feature,
                "graph_feature": functional.readout(residue_feature, batch.residue2graph, batch.batch_size,
                                                    self.readout)}
