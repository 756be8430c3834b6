"""Low-rank adapters (LoRA, Hu et al. 2021) on an ESM language model, through the `peft` library.

`lora: {rank, alpha, dropout, targets}` in an ESM config replaces each target projection of every transformer layer
(an `nn.Linear` W [D_out, D_in]) by peft's LoRA Linear: W x + (alpha / rank) B A dropout(x), A [rank, D_in] random,
B [D_out, rank] zero, so the model starts as its base. The base weights are frozen and only A and B train (their own
parameter group, `lora`, at `lora_lr_ratio`). Our fast paths (`attention`) call the projection modules, so they run
the adapters as fair-esm's own ESM-2 forward does.

In a state_dict (and so in every checkpoint) the base language model is left out when it came from a file: the
`LoRA` module stores a reference to that file instead (`file_fingerprint`: its size and a sha256 of its first and
last MiB, so that 15B is never hashed whole), and loading checks it against the file the config names. Random base
weights (`pretrained: false`) are kept whole: no file could rebuild them.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

from torch import nn

from ...checkpoint import CheckpointError
from ...registry import ArgumentRefused
from .architecture import family_of_module

logger = logging.getLogger("esm_gearnet")
MIB = 1 << 20

# Per model family: (the projections of a transformer layer that can carry an adapter, the default targets).
TARGETS = {
    # fair-esm's ESM2 (SaProt-format models are ESM-2 with another vocabulary): attention and feed-forward are
    # nn.Linear modules that every forward path calls. Default: attention only, as in the LoRA paper; fc1 and fc2
    # (the feed-forward, 2/3 of a layer's weights) on request.
    "ESM-2": (("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"), ("q_proj", "k_proj", "v_proj", "out_proj")),
    # fair-esm's ESM-1b attention (no rotary embeddings) hands the q/k/v/out_proj *weights* to torch's
    # multi_head_attention_forward, bypassing the modules: adapters there would be skipped silently. Only the
    # feed-forward can carry them, and there is no default.
    "ESM-1b": (("fc1", "fc2"), ()),
    # ESM C (`esmc.ESMC`, EvolutionaryScale's names): its attention has one fused projection, `layernorm_qkv` =
    # Sequential(LayerNorm, Linear(D, 3 D)), whose Linear `layernorm_qkv.1` takes one adapter for q, k and v
    # together; then `out_proj`, and the SwiGLU feed-forward `ffn.1` (gate and up, fused), `ffn.3`.
    "ESM C": (("layernorm_qkv.1", "out_proj", "ffn.1", "ffn.3"), ("layernorm_qkv.1", "out_proj")),
}


@dataclass
class LoRASettings:
    """The `lora:` block of an ESM config (checked key by key by `registry.check_arguments`).

    Args:
        rank: r, the rank of each adapter (A [r, D_in], B [D_out, r]).
        alpha: the adapters' output is scaled by alpha / rank.
        dropout: dropout on each adapter's input, in training.
        targets: the projections of every transformer layer that get an adapter (names in `TARGETS`); default:
            the model family's.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: Optional[List[str]] = None

    def __post_init__(self):
        if self.rank < 1:
            raise ArgumentRefused("rank", f"must be at least 1, got {self.rank!r}.")
        if self.alpha <= 0:
            raise ArgumentRefused("alpha", f"must be above 0, got {self.alpha!r}.")
        if not 0 <= self.dropout < 1:
            raise ArgumentRefused("dropout", f"must be in [0, 1), got {self.dropout!r}.")
        if self.targets is not None and not self.targets:
            raise ArgumentRefused("targets", "is empty; name the projections to adapt, or leave it out for the "
                                             "model family's default.")


def settings_of(lora: Any) -> LoRASettings:
    """`LoRASettings` of a config's `lora:` mapping (or the settings themselves)."""
    return lora if isinstance(lora, LoRASettings) else LoRASettings(**lora)


def targets_of(family: str, targets: Optional[Sequence[str]]) -> List[str]:
    """The projections that get adapters: `targets`, or the family's default.

    Raises:
        ArgumentRefused: (key `lora.targets`) a name the family's layers do not have, or no default.
    """
    available, default = TARGETS[family]
    if targets is None and not default:
        raise ArgumentRefused("lora.targets", f"is not given and {family} has no default: fair-esm's {family} "
                              "attention passes the q/k/v/out_proj weights to torch's multi_head_attention_forward, "
                              f"so adapters there would be skipped; name some of {', '.join(available)}.")
    unknown = [name for name in targets or () if name not in available]
    if unknown:
        raise ArgumentRefused("lora.targets", f"names {', '.join(map(str, unknown))}, which {family} models cannot "
                              f"adapt; the projections of their layers that take adapters are "
                              f"{', '.join(available)}.")
    return list(default if targets is None else dict.fromkeys(targets))


def file_fingerprint(file: str) -> Dict[str, Any]:
    """Which weight file this is, read in 2 MiB at most: its name, size and the sha256 of its first and last MiB
    (the whole file when it is smaller)."""
    size = os.path.getsize(file)
    hasher = hashlib.sha256()
    with open(file, "rb") as handle:
        hasher.update(handle.read(MIB))
        if size > MIB:
            handle.seek(max(MIB, size - MIB))
            hasher.update(handle.read())
    return {"file": os.path.basename(file), "size": size, "sha256_ends": hasher.hexdigest()}


def _is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


class LoRA(nn.Module):
    """Adapters on a language model's projections, its base frozen; in a state_dict, the adapters and (this
    module's extra state) the reference to the base weight files. An `ESM` holds it as `lora`, beside `model`.

    Args:
        settings: `LoRASettings` or its mapping.
        model: the language model module (fair-esm's ESM2 or ESM-1b, `esmc.ESMC`), changed in place: each target
            becomes peft's LoRA Linear (`base_layer`, `lora_A`, `lora_B`); every other parameter is frozen.
        name: the base model's name (`ESM-2-650M`, a file stem, a folder), for messages.
        files: the base weight files (fair-esm .pt, Hugging Face weight files); empty for random weights, which the
            state_dict then keeps whole.
    """

    def __init__(self, settings: Any, model: nn.Module, name: str, files: Sequence[str] = ()):
        super().__init__()
        try:
            import peft
        except ImportError:
            raise ImportError("ESM: `lora` needs the peft library: pip install peft (or esm_gearnet[lora]).") from None
        self.settings = settings_of(settings)
        self.targets = targets_of(family_of_module(model), self.settings.targets)
        config = peft.LoraConfig(r=self.settings.rank, lora_alpha=self.settings.alpha,
                                 lora_dropout=self.settings.dropout, target_modules=self.targets, bias="none")
        peft.inject_adapter_in_model(config, model)
        for parameter_name, parameter in model.named_parameters():
            parameter.requires_grad_(_is_adapter(parameter_name))
        self.files = list(files)
        self.reference = {"model": name, "files": [file_fingerprint(f) for f in self.files]} if files else None
        # the base's state_dict entries left out (a file rebuilds them); none for random weights
        self.base_keys = [k for k in model.state_dict() if not _is_adapter(k)] if files else []
        if self.base_keys:
            model.register_state_dict_post_hook(functools.partial(LoRA._drop_base, self))  # (no method: torch marks it)
            model.register_load_state_dict_pre_hook(self._note_prefix)
            model.register_load_state_dict_post_hook(self._base_is_not_missing)
        self._prefix = ""
        self.num_trainable = sum(p.numel() for p in adapter_parameters(model))
        self.num_base = sum(p.numel() for n, p in model.named_parameters() if not _is_adapter(n))
        logger.info("ESM %s: LoRA rank %d on %s: %d adapter parameters train, the base's %d are frozen (%.2f %%)",
                    name, self.settings.rank, ", ".join(self.targets), self.num_trainable, self.num_base,
                    100 * self.num_trainable / max(self.num_base, 1))

    # ---- the state_dict without the base --------------------------------------------------------------------
    def _drop_base(self, module, state_dict, prefix, local_metadata) -> None:
        for key in self.base_keys:
            state_dict.pop(prefix + key, None)

    def _note_prefix(self, module, state_dict, prefix, *rest) -> None:
        self._prefix = prefix

    def _base_is_not_missing(self, module, incompatible_keys) -> None:
        base = {self._prefix + key for key in self.base_keys}
        incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if k not in base]

    def get_extra_state(self) -> Optional[Dict[str, Any]]:
        return self.reference

    def set_extra_state(self, state: Optional[Dict[str, Any]]) -> None:
        """Refuse adapters trained on other base weights than the file(s) this model was built from."""
        if state == self.reference:
            return
        if state is None or self.reference is None:
            theirs = "random base weights (kept whole in it)" if state is None else \
                f"the base weights {state['model']} ({', '.join(f['file'] for f in state['files'])})"
            ours = "random base weights (pretrained: false)" if self.reference is None else \
                f"the weights in {', '.join(self.files)}"
            raise CheckpointError(f"the checkpoint's LoRA adapters were trained on {theirs}, but the config builds "
                                  f"{ours}; use the sequence model's config of the run that trained them.")
        ours = self.reference["files"]
        if len(state["files"]) != len(ours):
            what = f"is {len(ours)} file(s), the base of the adapters was {len(state['files'])}"
            where = ", ".join(self.files)
        else:
            i = next(i for i, (a, b) in enumerate(zip(state["files"], ours)) if a != b)
            theirs, mine, where = state["files"][i], ours[i], self.files[i]
            what = (f"has {mine['size']} bytes, the base of the adapters ({theirs['file']}) had {theirs['size']}"
                    if mine["size"] != theirs["size"] else
                    f"differs from the base of the adapters ({theirs['file']}) in its first or last MiB (sha256 "
                    f"{mine['sha256_ends'][:12]}... vs {theirs['sha256_ends'][:12]}...)")
        raise CheckpointError(f"the checkpoint's LoRA adapters were trained on {state['model']}, but the base weight "
                              f"file {where} {what}; point the sequence model's `path` at the weights the run "
                              "trained on.")


def adapter_parameters(module: nn.Module) -> List[nn.Parameter]:
    """The LoRA adapters' parameters in `module` (A [rank, D_in] and B [D_out, rank] of each adapted projection)."""
    return [p for name, p in module.named_parameters() if _is_adapter(name)]


def merge_lora(module: nn.Module, merge: bool = True) -> int:
    """Fold every LoRA adapter in `module` into its base weight, W + (alpha / rank) B A (peft's `merge`): the same
    outputs (to rounding) at the cost of the base model. `merge=False` takes them out again (`unmerge`).
    Cached ESM features are dropped. Returns the number of projections changed.

    After merging, the base weights in memory are no longer the file's: merge for inference (`embed`, `predict`
    do, at load), not before saving a checkpoint of random base weights (which would hold the sum).
    """
    if not any(isinstance(m, LoRA) for m in module.modules()):
        return 0
    from peft.tuners.lora import LoraLayer

    layers = [m for m in module.modules() if isinstance(m, LoraLayer) and bool(m.merged) != merge]
    for layer in layers:
        if merge:
            layer.merge()
        else:
            layer.unmerge()
    for part in module.modules():
        if hasattr(part, "clear_cache") and getattr(part, "lora", None) is not None:
            part.clear_cache()
    return len(layers)
