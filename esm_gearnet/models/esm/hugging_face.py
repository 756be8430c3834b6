"""ESM-2 weights in the Hugging Face format, loaded into fair-esm's `ESM2` module.

A Hugging Face ESM checkpoint is a folder with `config.json` (`model_type: esm`) and the weights as
`model.safetensors` or `pytorch_model.bin` (or shards listed in `model.safetensors.index.json` /
`pytorch_model.bin.index.json`), as `transformers` writes them for `EsmModel` and `EsmForMaskedLM`
(`facebook/esm2_t*`). Reading one needs neither `transformers` nor network access: `config.json` is plain JSON,
`.safetensors` files hold tensors only, and `.bin` files are read with `torch.load(weights_only=True)`.

The architecture comes from `config.json`; the parameters are renamed onto fair-esm's (`HF_LAYER_NAMES`), so
the module, its forward paths and every state_dict this framework writes stay the same as for fair-esm's `.pt`
files. Spellings that `transformers` versions write are all read: `LayerNorm.weight`/`.bias` or
`LayerNorm.gamma`/`.beta` (transformers 5 writes the latter), the rotary `inv_freq` per layer
(`encoder.layer.{i}.attention.self.rotary_embeddings.inv_freq`), once for the model (`rotary_embeddings.inv_freq`)
or with a literal `*` for the layer (transformers 5), an `esm.` prefix (`EsmForMaskedLM` and the other heads).
"""
from __future__ import annotations

import json
import os
import pickle
import re
import warnings
import zipfile
from typing import Dict, List, Tuple

import torch

from ...checkpoint import load_state_dict_checked, skipping_init
from .architecture import WeightError, build_esm2, show_keys
from .vocabularies import VOCABULARIES

# config.json values absent from the file take transformers' EsmConfig defaults (it writes only some keys)
HF_DEFAULTS = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
               "position_embedding_type": "absolute", "token_dropout": False, "emb_layer_norm_before": None,
               "layer_norm_eps": 1e-12, "is_folding_model": False, "is_decoder": False,
               "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "vocab_size": None,
               "vocab_list": None, "pad_token_id": None, "mask_token_id": None}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
# fair-esm name within `layers.{i}.` -> Hugging Face name within `encoder.layer.{i}.` (weight and bias each)
HF_LAYER_NAMES = {"self_attn.q_proj": "attention.self.query", "self_attn.k_proj": "attention.self.key",
                  "self_attn.v_proj": "attention.self.value", "self_attn.out_proj": "attention.output.dense",
                  "self_attn_layer_norm": "attention.LayerNorm", "fc1": "intermediate.dense",
                  "fc2": "output.dense", "final_layer_norm": "LayerNorm"}
# heads and buffers of transformers' ESM classes that the residue features never use
IGNORED = re.compile(r"^(pooler\.|classifier\.|embeddings\.position_ids$|embeddings\.position_embeddings\.weight$)")
INV_FREQ = re.compile(r"^(?:encoder\.layer\.(\d+|\*)\.attention\.self\.)?rotary_embeddings\.inv_freq$")


def is_hf_folder(path) -> bool:
    """Whether `path` is a folder holding `config.json` (a Hugging Face checkpoint, ESM or not)."""
    return path is not None and os.path.isfile(os.path.join(os.path.expanduser(str(path)), "config.json"))


def read_config(folder: str) -> Dict:
    """`config.json` of a Hugging Face ESM-2 folder, transformers' defaults filled in (an ESM C folder's as it
    is: `esmc.from_hugging_face` reads it)."""
    file = os.path.join(folder, "config.json")
    try:
        with open(file) as handle:
            config = json.load(handle)
    except (OSError, ValueError) as error:
        raise WeightError(f"ESM: {file} is not readable JSON ({error}); save the checkpoint again with "
                          "`save_pretrained`.") from None
    if not isinstance(config, dict) or config.get("model_type") not in ("esm", "esmc"):
        kind = config.get("model_type") if isinstance(config, dict) else None
        raise WeightError(f"ESM: {file} describes a {kind!r} model, not a Hugging Face ESM-2 or ESM C checkpoint "
                          "(model_type: esm or esmc); point `path` at a folder such as facebook/esm2_t33_650M_UR50D, "
                          "at a folder of fair-esm .pt files or of EvolutionaryScale's ESM C .pth files.")
    return {**HF_DEFAULTS, **config} if config["model_type"] == "esm" else config


# ---- vocabulary ------------------------------------------------------------------------------------------
# A vocabulary is recognised by its token list (vocab.txt or config's vocab_list) when the folder has one, else
# by its size and special-token ids.


def _tokens_of(folder: str, config: Dict):
    """The folder's token list (vocab.txt, else config's vocab_list), or None when it names none."""
    file = os.path.join(folder, "vocab.txt")
    if os.path.isfile(file):
        with open(file) as handle:
            return [line.strip() for line in handle if line.strip()]
    return list(config["vocab_list"]) if config.get("vocab_list") else None


def hf_alphabet(folder: str, config: Dict):
    """(vocabulary name, fair-esm Alphabet) of a Hugging Face ESM folder; one sentence if it is none we know."""
    tokens = _tokens_of(folder, config)
    for name, factory in VOCABULARIES.items():
        alphabet = factory()
        if tokens is not None:
            matches = tokens == list(alphabet.all_toks)
        else:
            matches = (config["vocab_size"] == len(alphabet.all_toks)
                       and config["pad_token_id"] in (None, alphabet.padding_idx)
                       and config["mask_token_id"] in (None, alphabet.mask_idx))
        if matches and config["vocab_size"] in (None, len(alphabet.all_toks)):
            return name, alphabet
    size = len(tokens) if tokens is not None else config["vocab_size"]
    raise WeightError(f"ESM: {folder} has a vocabulary of {size} tokens (pad id {config['pad_token_id']}, mask id "
                      f"{config['mask_token_id']}), not one this framework reads: "
                      + ", ".join(f"{name}'s {len(make().all_toks)} tokens" for name, make in VOCABULARIES.items())
                      + ".")


# ---- architecture ------------------------------------------------------------------------------------------

def check_architecture(folder: str, config: Dict) -> None:
    """One sentence for a config.json that fair-esm's ESM2 module cannot reproduce."""
    dim, heads = config["hidden_size"], config["num_attention_heads"]
    problems = []
    if config["is_folding_model"]:
        problems.append("is_folding_model is true (ESMFold); only the ESM language model is read")
    if config["position_embedding_type"] != "rotary":
        problems.append(f"position_embedding_type is {config['position_embedding_type']!r}, ESM-2 uses 'rotary' "
                        "(ESM-1b loads from its fair-esm .pt file instead)")
    if config["emb_layer_norm_before"]:
        problems.append("emb_layer_norm_before is true, ESM-2 has no embedding layer norm")
    if config["intermediate_size"] != 4 * dim:
        problems.append(f"intermediate_size is {config['intermediate_size']}, ESM-2 uses 4 x hidden_size = {4 * dim}")
    if dim % heads:
        problems.append(f"hidden_size {dim} is not a multiple of num_attention_heads {heads}")
    if config["is_decoder"]:
        problems.append("is_decoder is true, ESM-2 attends in both directions")
    if problems:
        raise WeightError(f"ESM: {folder}/config.json is not an ESM-2 architecture: {'; '.join(problems)}.")
    dropout = {k: config[k] for k in ("hidden_dropout_prob", "attention_probs_dropout_prob") if config[k]}
    if dropout:
        warnings.warn(f"ESM: {folder}/config.json sets {dropout}; fair-esm's ESM-2 module (used here) applies "
                      "no dropout (ESM-2's own configs set 0.0); eval-mode features are unaffected.", stacklevel=4)


# ---- weights -----------------------------------------------------------------------------------------------

def _load_file(file: str) -> Dict[str, torch.Tensor]:
    """The tensors of one weight file, memory-mapped: safetensors maps its files; a pytorch_model.bin in torch's
    zip format is mapped too (read whole in torch's older format)."""
    if file.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(file, device="cpu")
    return torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))


def weight_files(folder: str) -> List[str]:
    """The weight files of a Hugging Face folder: its one file, or the shards its index lists."""
    present = [name for name in WEIGHT_FILES if os.path.isfile(os.path.join(folder, name))]
    if not present:
        raise WeightError(f"ESM: {folder} has config.json but no weights ({', '.join(WEIGHT_FILES)}); copy the "
                          "weight file of the checkpoint into that folder.")
    index = os.path.join(folder, present[0])
    if not index.endswith(".index.json"):
        return [index]
    with open(index) as handle:
        return [os.path.join(folder, shard) for shard in sorted(set(json.load(handle)["weight_map"].values()))]


def read_weights(folder: str) -> Dict[str, torch.Tensor]:
    """The tensors of a Hugging Face folder (one file or the shards of an index), never unpickling code.

    Returns:
        {name: tensor [that parameter's shape]}: the folder's state_dict.
    """
    present = [name for name in WEIGHT_FILES if os.path.isfile(os.path.join(folder, name))]
    if not present:
        raise WeightError(f"ESM: {folder} has config.json but no weights ({', '.join(WEIGHT_FILES)}); copy the "
                          "weight file of the checkpoint into that folder.")
    try:
        files = weight_files(folder)
        state: Dict[str, torch.Tensor] = {}
        for file in files:
            state.update(_load_file(file))
    except pickle.UnpicklingError:  # weights_only refused a class: running it would mean running its code
        raise WeightError(f"ESM: the weights in {folder} ({present[0]}) hold pickled Python objects besides "
                          "tensors, which are never unpickled here; save them again with `save_pretrained` "
                          "(model.safetensors).") from None
    except Exception as error:  # noqa: BLE001 - a damaged or truncated file: one sentence
        message = re.sub(r"\x1b\[[0-9;]*m", "", str(error).splitlines()[0] if str(error) else "")
        raise WeightError(f"ESM: the weights in {folder} ({present[0]}) cannot be read "
                          f"({type(error).__name__}: {message.split('. ')[0][:200]}); download the checkpoint "
                          "again.") from None
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightError(f"ESM: {folder}/{present[0]} holds more than tensors; it is not a Hugging Face "
                          "checkpoint of weights.")
    return state


def to_fair_esm(state: Dict[str, torch.Tensor], model, folder: str,
                rope_theta: float = 10000.0) -> Dict[str, torch.Tensor]:
    """Rename a Hugging Face ESM state_dict onto the fair-esm `ESM2` module `model` (its full state_dict).

    Args:
        state: {Hugging Face name: tensor [that parameter's shape]}.
    Returns:
        {fair-esm name: tensor [that parameter's shape]}, every key of `model.state_dict()`.

    Heads the checkpoint lacks (`EsmModel` has no language-model head; older ones no contact head) are set to
    zeros (layer-norm scales to ones): they are never used for features, and loading stays deterministic.

    Raises:
        WeightError: missing, unexpected or mis-shaped keys, named in one sentence with the folder.
    """
    prefix = "esm." if any(k.startswith("esm.") for k in state) else ""
    own = model.state_dict()
    # Hugging Face name (without the esm. prefix, LayerNorm.weight/.bias spelling) -> fair-esm name
    names = {"embeddings.word_embeddings.weight": "embed_tokens.weight"}
    for p in ("weight", "bias"):
        names[f"encoder.emb_layer_norm_after.{p}"] = f"emb_layer_norm_after.{p}"
        for i in range(model.num_layers):
            for fair, hf in HF_LAYER_NAMES.items():
                names[f"encoder.layer.{i}.{hf}.{p}"] = f"layers.{i}.{fair}.{p}"
    optional = {f"contact_head.regression.{p}": f"contact_head.regression.{p}" for p in ("weight", "bias")}
    heads = {f"lm_head.{part}.{p}": f"lm_head.{part}.{p}" for part in ("dense", "layer_norm")
             for p in ("weight", "bias")}
    heads["lm_head.bias"] = "lm_head.bias"  # names shared by transformers' EsmLMHead and fair-esm's

    found: Dict[str, torch.Tensor] = {}
    inv_freq: Dict[str, torch.Tensor] = {}
    unexpected, misshaped = [], []
    tied_decoder = None
    for key, value in state.items():
        base = key.startswith(prefix)  # inside the `esm.` base model (always, without a prefix)
        head = not prefix or not base  # where transformers keeps heads (lm_head, classifier)
        name = key[len(prefix):] if base else key
        name = re.sub(r"\.LayerNorm\.gamma$", ".LayerNorm.weight", name)  # transformers 5's spelling
        name = re.sub(r"\.LayerNorm\.beta$", ".LayerNorm.bias", name)
        if base and (name in names or name in optional):
            target = names.get(name) or optional[name]
        elif head and name in heads:
            target = heads[name]
        elif base and INV_FREQ.match(name):
            layer = INV_FREQ.match(name).group(1)
            inv_freq["*" if layer in (None, "*") else layer] = value
            continue
        elif head and name == "lm_head.decoder.weight":
            tied_decoder = value
            continue
        elif IGNORED.match(name):
            continue
        else:
            unexpected.append(key)
            continue
        if tuple(value.shape) != tuple(own[target].shape):
            misshaped.append(f"{key} {tuple(value.shape)} vs {tuple(own[target].shape)}")
        found[target] = value
    missing = [prefix + hf for hf, fair in names.items() if fair not in found]
    lm_parts = [fair for fair in heads.values() if fair in found]
    if lm_parts and len(lm_parts) < len(heads):
        missing += [hf for hf, fair in heads.items() if fair not in found]
    for layer in inv_freq:
        if layer != "*" and int(layer) >= model.num_layers:
            unexpected.append(f"{prefix}encoder.layer.{layer}.attention.self.rotary_embeddings.inv_freq")
    for layer in range(model.num_layers):
        key = f"layers.{layer}.self_attn.rot_emb.inv_freq"
        value = inv_freq.get(str(layer), inv_freq.get("*"))
        if value is None:  # not saved: ESM-2's rotary frequencies, as transformers computes them
            dim = own[key].shape[0] * 2
            value = 1.0 / (rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        elif tuple(value.shape) != tuple(own[key].shape):
            misshaped.append(f"rotary_embeddings.inv_freq {tuple(value.shape)} vs {tuple(own[key].shape)}")
            break
        found[key] = value
    if missing or unexpected or misshaped:
        raise WeightError(f"ESM: the weights in {folder} do not fit the ESM-2 architecture of its config.json: "
                          f"missing keys: {show_keys(missing)}; unexpected keys: {show_keys(unexpected)}; "
                          f"mis-shaped keys (file vs model): {show_keys(misshaped)}.")
    embedding = found["embed_tokens.weight"]
    if tied_decoder is not None and not torch.equal(tied_decoder.to(embedding.dtype), embedding):
        raise WeightError(f"ESM: {folder} has a language-model decoder (lm_head.decoder.weight) that differs from "
                          "its token embedding; fair-esm's ESM-2 ties the two, so this checkpoint cannot be read.")
    found["lm_head.weight"] = embedding  # the same parameter as embed_tokens.weight in fair-esm
    for key, value in own.items():  # heads the checkpoint lacks
        if key not in found:
            found[key] = torch.ones_like(value) if key == "lm_head.layer_norm.weight" else torch.zeros_like(value)
    return found


def load_hf_esm(folder: str) -> Tuple[object, object, Dict]:
    """fair-esm `ESM2` module with the weights of a Hugging Face ESM folder, its alphabet and its config.json (an
    ESM C folder: the `esmc.ESMC` module)."""
    folder = os.path.expanduser(str(folder))
    config = read_config(folder)
    if config["model_type"] == "esmc":
        from .esmc import from_hugging_face

        return (*from_hugging_face(read_weights(folder), folder, config), config)
    check_architecture(folder, config)
    _, alphabet = hf_alphabet(folder, config)
    state = read_weights(folder)
    with skipping_init():  # every weight comes from the folder (to_fair_esm fills the heads it lacks)
        model, _ = build_esm2(config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
                              token_dropout=bool(config["token_dropout"]), alphabet=alphabet)
    eps = float(config["layer_norm_eps"])
    for module in model.modules():  # transformers' ESM uses config's eps in every layer norm
        if "LayerNorm" in type(module).__name__ and hasattr(module, "eps"):
            module.eps = eps
    rope_theta = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta") or 10000.0
    load_state_dict_checked(model, to_fair_esm(state, model, folder, float(rope_theta)), folder, assign=True)
    return model, alphabet, config
