"""ESM protein language models as a residue encoder: the `ESM` class of configs (`class: ESM`).

The package's parts, each used here: `architecture` (names, fair-esm's module), `weights` (where they come from:
fair-esm files, `hugging_face` folders, random), `vocabularies` (ESM-2, SaProt), `tokens` (residues -> tokens,
windows, padded or packed), `attention` (the sdpa and varlen forward paths), `cache` (features of a frozen model),
`lora` (low-rank adapters through peft).
"""
from __future__ import annotations

import inspect
import logging
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ...data import constants
from ...data.protein import ProteinBatch
from ...layers import functional
from ...registry import register
from ..encoder import Encoder, Features
from . import weights
from .architecture import family_of_module, language_models
from .attention import esm2_forward_sdpa, esm2_forward_varlen, sdpa_layer, varlen_layer_fn
from .cache import FeatureCache
from .esmc import CONTEXT as ESMC_CONTEXT
from .lora import LoRA, LoRASettings, adapter_parameters, settings_of, targets_of
from .tokens import CONTEXT, Tokenizer

logger = logging.getLogger("esm_gearnet")


@register
class ESM(Encoder):
    """ESM protein language model over the residues of a ProteinBatch.

    Args:
        path: folder of the official fair-esm weight files (`esm2_t33_650M_UR50D.pt`, ...), of EvolutionaryScale's
            ESM C files (`esmc_600m_2024_12_v0.pth`, also under `data/weights/` as their Hugging Face repositories
            hold it), or of a Hugging Face checkpoint (`config.json` with `model_type: esm` or `esmc`, and
            `model.safetensors` or `pytorch_model.bin`, as `save_pretrained` writes `EsmModel` / `EsmForMaskedLM`,
            e.g. facebook/esm2_t33_650M_UR50D, or `EsmcModel` / `EsmcForMaskedLM`); see `hugging_face` and
            `esmc`. None needs network access or unpickles code; `transformers` is not needed.
        model: ESM-2-8M, -35M, -150M, -650M, -3B, -15B, ESM-1b, ESM-C-300M or ESM-C-600M; or a checkpoint file
            stem in `path`.
            How `model` and `path` decide what is loaded (pretrained weights):
            - `model` given and `path/<its stem>.pt` exists: that fair-esm file, exactly as without Hugging Face
              (ESM C: `<stem>.pth`, EvolutionaryScale's file, in `path` or `path/data/weights`).
            - otherwise, `path` holds `config.json`: the Hugging Face checkpoint; its config.json decides the
              architecture, and `model`, when given, must be the ESM-2 name of that architecture (a check).
            - otherwise the fair-esm file of `model`, ESM-2-650M when `model` is omitted.
            With `pretrained: false`, `path` is not read: `model` (default ESM-2-650M) or `architecture` decides.
        readout: "mean" or "sum" over residues (special tokens excluded).
        pretrained: False builds the architecture with random weights (no file needed; ESM-2 and ESM C names).
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
        architecture: (num_layers, embed_dim, heads) for a custom random-weight ESM-2 (pretrained False), or ESM C
            when `model` names an ESM C.
        context: tokens of a window, `<cls>` and `<eos>` included: longer proteins are cut into windows of
            `context - 2` residues. Default: the model's training length, 1024 (ESM-2, ESM-1b, SaProt) or 2048
            (ESM C).
        activation_checkpointing: recompute each layer in the backward pass instead of storing its activations
            (less memory for long proteins and big models, about one more forward of time; sdpa and varlen).
        feature_cache_gib: host memory (GiB) for the residue features of a *frozen* ESM (`freeze`, which
            `fix_sequence_model` or `sequence_model_lr_ratio: 0` call). Each protein's features are then computed
            once and reused, keyed by the exact residue sequence fed to ESM: a crop or mutation that changes
            the sequence is a new entry, never a wrong hit. Proteins are added until the budget is full.
            Masked residues (pre-training) bypass the cache. 0 turns it off.
        compile: run each transformer layer through `torch.compile` (dynamic shapes; sdpa and varlen). The first
            batches pay the compilation (tens of seconds); on CPU it needs a C++ compiler.
        vocabulary: "ESM-2", "SaProt" (SaProt's 446 structure-aware tokens) or "ESM C" (ESM-2's 33 tokens but for
            id 31, the chain break `|`; an unknown residue reads as `X`, see `vocabularies`). With
            `pretrained: false`, the vocabulary of the random model (default ESM-2; an ESM C `model` has its own);
            pretrained models take theirs from their files, and `vocabulary`, when given, is a check that they have
            it (so a config can name it and still build with random weights when shrunk).
        plddt_mask: SaProt-format models only: replace the 3Di letter by `#` where the residue's pLDDT
            (`Protein.bfactor`, the CA B-factor, which AlphaFold DB files fill with pLDDT) is below
            `plddt_threshold`, as SaProt does for AlphaFold structures. Nothing in a parsed protein says whether
            its B-factors are pLDDT, so this is an option: true for AlphaFold / ESMFold models, false (default)
            for experimental structures, whose B-factors are not confidences (SaProt's own "auto" looks for
            the word "alphafold" in the file, which a parsed protein no longer has).
        plddt_threshold: pLDDT below which the structure is masked (SaProt: 70).
        lora: low-rank adapters (`lora.LoRASettings`: rank, alpha, dropout, targets) on the projections of every
            layer, through peft: the base weights are frozen (whatever `sequence_model_lr_ratio` says) and the
            adapters train, in the parameter group `lora` (`lora_lr_ratio`). Checkpoints hold the adapters and a
            reference to the base weight file, not the base (see `lora`). Not frozen while the adapters train, so
            the feature cache stays unused then.
        graph_construction_model: optional (ESM reads the sequence only; a node layer such as AlphaCarbonNode
            still decides which residues it sees).

    **SaProt-format models** (a checkpoint whose vocabulary is SaProt's amino-acid x 3Di tokens, `vocabularies`) read
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

    **ESM C** (`model: ESM-C-300M` / `ESM-C-600M`, or its files; `esmc`) runs on the same paths (sdpa, varlen,
    activation checkpointing, compile, the feature cache, `fsdp` units, LoRA on `layernorm_qkv.1` and `out_proj`
    by default): no token dropout, `<mask>` is id 32 as in ESM-2.

    Proteins longer than `context - 2` residues (1022 for ESM-2) are cut into windows (a DEVIATION from the
    original, see `tokens`).
    """

    group = "sequence_model"
    small_config = {"pretrained": False, "architecture": [1, 32, 4]}

    @classmethod
    def check_config(cls, arguments: Dict[str, Any]) -> None:
        """Before anything is built (`registry.check`): the weights the arguments name are there."""
        given = {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
                 if p.default is not p.empty}
        given.update(arguments)
        kind, where, stem = weights.weight_source(given["path"], given["model"], given["pretrained"],
                                              given["architecture"])
        if given["lora"] is not None:  # the family's projections, known from the weights' name
            targets_of(weights.family(kind, where, stem, given["model"]), settings_of(given["lora"]).targets)

    def __init__(self, path: Optional[str] = None, model: Optional[str] = None, readout: str = "mean",
                 pretrained: bool = True, repr_layer: Optional[int] = None, attention: str = "sdpa",
                 architecture: Optional[Tuple[int, int, int]] = None, activation_checkpointing: bool = False,
                 feature_cache_gib: float = 0.0, compile: bool = False, vocabulary: Optional[str] = None,
                 plddt_mask: bool = False, plddt_threshold: float = 70.0, lora: Optional[LoRASettings] = None,
                 context: Optional[int] = None, graph_construction_model: Optional[nn.Module] = None):
        super().__init__(graph_construction_model)
        if readout not in ("mean", "sum"):
            raise ValueError(f"ESM: readout must be 'mean' or 'sum', got {readout!r}.")
        if attention not in ("sdpa", "esm", "varlen"):
            raise ValueError(f"ESM: attention must be 'sdpa', 'esm' or 'varlen', got {attention!r}.")
        for option, value in (("activation_checkpointing", activation_checkpointing), ("compile", compile)):
            if value and attention == "esm":
                raise ValueError(f"ESM: {option} works on the sdpa and varlen paths; set `attention: sdpa`.")
        esm_model, alphabet = weights.load(path, model, pretrained, architecture, vocabulary)
        # before `model`: a state_dict's reference to the base weights is checked before the adapters load
        self.lora = LoRA(lora, esm_model, *weights.weight_files(path, model, pretrained, architecture)) \
            if lora is not None else None
        self.model = esm_model
        self.alphabet = alphabet
        self.readout = readout
        self.attention = attention
        self.family = family_of_module(esm_model)
        if attention == "esm" and self.family == "ESM C":
            raise ValueError("ESM: `attention: esm` is fair-esm's own forward, which ESM C does not have; use sdpa or "
                             "varlen.")
        fast = self.family != "ESM-1b"  # the sdpa and varlen paths: ESM-2 (SaProt) and ESM C
        if (activation_checkpointing or compile) and not fast:
            raise ValueError("ESM: activation_checkpointing and compile are built for ESM-2 and ESM C models; remove "
                             "them for ESM-1b.")
        if attention == "varlen" and not fast:
            raise ValueError("ESM: `attention: varlen` is built for ESM-2 and ESM C models; use `attention: esm` for "
                             "ESM-1b.")
        self.activation_checkpointing = activation_checkpointing
        if attention == "varlen":
            self._layer_fn = varlen_layer_fn(compile)
        else:
            self._layer_fn = torch.compile(sdpa_layer, dynamic=True) if compile else sdpa_layer
        self.feature_cache = FeatureCache(feature_cache_gib)
        num_layers = esm_model.num_layers
        self.repr_layer = num_layers if repr_layer is None else repr_layer
        if not 0 <= self.repr_layer <= num_layers:
            raise ValueError(f"ESM: repr_layer must be within 0..{num_layers}, got {repr_layer}.")
        self.output_dim = esm_model.embed_dim
        # the language-model and contact heads are never used for features: frozen, so DDP finds no unused
        # parameters (lm_head.weight is the token embedding itself, which stays trainable)
        shared = {id(p) for p in (esm_model.embed if self.family == "ESM C" else esm_model.embed_tokens).parameters()}
        for head in ("lm_head", "contact_head", "sequence_head"):
            for parameter in getattr(esm_model, head).parameters() if hasattr(esm_model, head) else ():
                if id(parameter) not in shared:
                    parameter.requires_grad_(False)
        if context is None:
            context = ESMC_CONTEXT if self.family == "ESM C" else CONTEXT
        self.tokens = Tokenizer(alphabet, plddt_mask, plddt_threshold, context)
        self.saprot = self.reads_three_di = self.tokens.saprot

    def parameter_groups(self) -> Dict[str, List[nn.Parameter]]:
        """{"sequence_model": every parameter}; with `lora`, the adapters apart as "lora" (the base, frozen, stays
        in "sequence_model")."""
        if self.lora is None:
            return super().parameter_groups()
        adapters = adapter_parameters(self.model)
        ids = {id(p) for p in adapters}
        return {self.group: [p for p in self.parameters() if id(p) not in ids], "lora": adapters}

    @property
    def is_frozen(self) -> bool:
        """Whether none of the language model's weights train (`freeze` of its group; with `lora`, of the adapters,
        the base being frozen anyway): it then runs without autograd and may cache its features."""
        return ("lora" if self.lora is not None else self.group) in self.frozen

    def structure_tokens(self, batch: ProteinBatch) -> Optional[torch.Tensor]:
        """The structure column of each residue's SaProt token (`Tokenizer.structure`; rules in the class docstring).

        Args:
            batch: residue_type [N] and the structure it holds (three_di_state [N] or atom_pos [N, 14, 3]).
        Returns:
            [N] long: 3Di state 0..19, 20 for `#`; None for a model of another vocabulary.
        """
        return self.tokens.structure(batch)

    def token_strings(self, batch: ProteinBatch, residue_mask: Optional[torch.Tensor] = None) -> List[str]:
        """Each protein's tokens as one string (SaProt: `MdEvVp...`; ESM-2: its residue letters), without
        `<cls>` / `<eos>`.

        Args:
            batch: residue_type [N], num_residues [B].
            residue_mask: [N] bool, masked residues.
        """
        return self.tokens.strings(batch, residue_mask)

    def tokenize(self, batch: ProteinBatch, residue_mask: Optional[torch.Tensor] = None):
        """Padded ESM tokens of a batch, long proteins split into windows of at most `context - 2` residues.

        Args:
            batch: read: residue_type [N], num_residues [B] (and the 3Di states of SaProt-format models).
            residue_mask: [N] bool, residues that get the mask token.
        Returns:
            tokens [W, T], and the (window row, column) of every packed residue ([N], [N]).
        """
        return self.tokens.padded(batch.residue_type, batch.num_residues, residue_mask, self.structure_tokens(batch))

    def tokenize_packed(self, batch: ProteinBatch, residue_mask: Optional[torch.Tensor] = None):
        """Unpadded ESM tokens of a batch (`attention: varlen`), see `Tokenizer.packed`.

        Args:
            batch: read: residue_type [N], num_residues [B] (and the 3Di states of SaProt-format models).
            residue_mask: [N] bool, residues that get the mask token.
        Returns:
            tokens [T], cu_seqlens [W + 1] and the token of every packed residue [N].
        """
        return self.tokens.packed(batch.residue_type, batch.num_residues, residue_mask, self.structure_tokens(batch))

    def checkpoint_mismatch(self, state: Dict[str, torch.Tensor], prefix: str) -> Optional[str]:
        """Why `state` cannot load here, when it holds another family's language model where this one's belongs
        (`checkpoint.load_state_dict_checked` asks); None otherwise.

        Args:
            state: {name: tensor [that parameter's shape]}, a whole state dict; this encoder's keys under `prefix`.
        """
        theirs = language_models(state).get(prefix + "model.")
        ours = language_models(self.model.state_dict())[""]
        if theirs is None or theirs.split(" (")[0] == ours.split(" (")[0]:
            return None
        return (f"holds an {theirs} language model at {prefix}model, but the config builds an {ours}; weights load "
                "only into the family that trained them: use the config of the run that wrote the checkpoint.")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The original saved a `mapping` buffer (unknown residues -> -1, which ESM cannot embed). It must agree
        # with ours on the 20 amino acids; ours is kept.
        key = prefix + "mapping"
        if key in state_dict:
            theirs = state_dict.pop(key)
            ours = self.tokens.mapping[:constants.NUM_RESIDUE_TYPES].cpu()
            if not torch.equal(theirs[:constants.NUM_RESIDUE_TYPES].cpu(), ours):
                raise ValueError(f"{key}: the checkpoint maps residues to ESM tokens in another order than this "
                                 "framework (G A S P V T C I L N D Q K E M H F R Y W); it cannot be loaded as is.")
        self.clear_cache()  # cached features belong to the old weights
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _features(self, residue_type: torch.Tensor, num_residues: torch.Tensor,
                  residue_mask: Optional[torch.Tensor] = None, structure: Optional[torch.Tensor] = None
                  ) -> torch.Tensor:
        """[N, D] residue features of packed proteins (residue_type [N], num_residues [B], residue_mask [N],
        structure [N]: SaProt's structure column, see `structure_tokens`)."""
        if self.attention == "varlen":
            tokens, cu_seqlens, token = self.tokens.packed(residue_type, num_residues, residue_mask, structure)
            hidden = esm2_forward_varlen(self.model, tokens, cu_seqlens, self.repr_layer, self.alphabet.mask_idx,
                                         checkpoint=self.activation_checkpointing, layer_fn=self._layer_fn)
            return hidden[token]
        tokens, window, column = self.tokens.padded(residue_type, num_residues, residue_mask, structure)
        if self.attention == "sdpa" and self.family != "ESM-1b":
            hidden = esm2_forward_sdpa(self.model, tokens, self.repr_layer, self.alphabet.padding_idx,
                                       self.alphabet.mask_idx, checkpoint=self.activation_checkpointing,
                                       layer_fn=self._layer_fn)
        else:
            hidden = self.model(tokens, repr_layers=[self.repr_layer])["representations"][self.repr_layer]
        return hidden[window, column]

    def _cached_features(self, batch: ProteinBatch) -> torch.Tensor:
        """[N, D] features of a frozen ESM-2, computed only for the proteins not cached yet (in one batch)."""
        sizes = batch.num_residues.tolist()
        structure = self.structure_tokens(batch)
        # the key is the token of every residue: residue types, and for SaProt-format models their 3Di letters
        key_tensor = batch.residue_type if structure is None else self.tokens.ids(batch.residue_type, None, structure)
        key_dtype = torch.uint8 if structure is None else torch.int16
        keys = [chunk.numpy().tobytes() for chunk in key_tensor.to("cpu", key_dtype).split(sizes)]
        missing = [i for i, key in enumerate(keys) if key not in self.feature_cache]
        fresh: Dict[bytes, torch.Tensor] = {}
        if missing:
            chosen = torch.zeros(batch.batch_size, dtype=torch.bool, device=batch.residue_type.device)
            chosen[missing] = True
            residues = chosen[batch.residue2graph]
            computed = self._features(batch.residue_type[residues], batch.num_residues[chosen], None,
                                      None if structure is None else structure[residues])
            for i, feature in zip(missing, computed.split([sizes[i] for i in missing])):
                fresh[keys[i]] = feature
                self.feature_cache.add(keys[i], feature)
        device = batch.residue_type.device
        return torch.cat([fresh[key] if key in fresh else self.feature_cache.get(key, device) for key in keys])

    def shard_units(self):
        """Each transformer layer (`attention` enters them through `sharding.call`); the embeddings and the last
        layer norm stay with the task. A feature cache is turned off: under `fsdp` every rank must run the layers
        for every batch (each is a collective), not only the ranks whose proteins are not cached."""
        if self.feature_cache.budget:
            logger.info("ESM: the feature cache is off under engine.strategy: fsdp")
            self.feature_cache = FeatureCache(0.0)
        return [(layer, ()) for layer in self.model.layers]

    def clear_cache(self) -> None:
        """Forget every cached feature (they belong to the weights they were computed with)."""
        self.feature_cache.clear()

    def encode(self, batch: ProteinBatch, residue_mask: Optional[torch.Tensor] = None) -> Features:
        """ESM's features of the batch's residues.

        Args:
            batch: packed proteins (`residue_type` [N], `num_residues` [B]; SaProt-format models read the 3Di
                states or the backbone, and `bfactor` [N] with `plddt_mask`).
            residue_mask: [N] bool (optional), residues that get ESM's `<mask>` token.
        Returns:
            residue_feature [N, D] and graph_feature [B, D] (the readout over each protein's residues).
        """
        if not self.is_frozen:
            residue_feature = self._features(batch.residue_type, batch.num_residues, residue_mask,
                                             self.structure_tokens(batch))
        else:  # no gradient reaches a frozen ESM: keep no activations for one
            with torch.no_grad():
                if self.feature_cache.budget > 0 and residue_mask is None and self.family != "ESM-1b" \
                        and batch.batch_size:
                    residue_feature = self._cached_features(batch)
                else:
                    residue_feature = self._features(batch.residue_type, batch.num_residues, residue_mask,
                                                     self.structure_tokens(batch))
        return {"residue_feature": residue_feature,
                "graph_feature": functional.readout(residue_feature, batch.residue2graph, batch.batch_size,
                                                    self.readout)}
