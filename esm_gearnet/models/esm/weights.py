"""Where an ESM model's weights come from, and the model built with them: fair-esm's `.pt` files, EvolutionaryScale's
ESM C `.pth` files (`esmc`), a Hugging Face folder of ESM-2 or ESM C (`hugging_face`), or random weights of a named
architecture (`pretrained: false`). `weight_source` decides without reading a file (also when a config is checked,
before anything is built); `load` builds."""
from __future__ import annotations

import os
import warnings
from typing import List, Optional, Tuple

import torch

from ...checkpoint import skipping_init
from .architecture import (
    ARCHITECTURES,
    DEFAULT_MODEL,
    WeightError,
    build_esm2,
    esm2_from_checkpoint,
    family_of_name,
    family_of_stem,
    load_esm_checkpoint,
)
from .esmc import build_esmc, load_release, release_file
from .hugging_face import is_hf_folder, load_hf_esm, read_config, weight_files as hf_weight_files
from .vocabularies import VOCABULARIES

URL = "https://dl.fbaipublicfiles.com/fair-esm/models/{}.pt"


def _fair_esm_file(path: str, stem: str) -> str:
    """`<path>/<stem>.pt` (ESM C: `<stem>.pth`, `esmc.release_file`), or one sentence saying where to download it."""
    if family_of_stem(stem) == "ESM C":
        return release_file(path, stem)
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
        if stem.startswith("esm2"):
            model_data["model"].update(regression_data["model"])
            return esm2_from_checkpoint(model_data, file)
        # ESM-1b: fair-esm's own loader, which copies the file's weights into its module, strictly (the
        # contact-regression keys are always given): the module is built without initialising them
        with skipping_init():
            return esm.pretrained.load_model_and_alphabet_core(stem, model_data, regression_data)


def weight_source(path: Optional[str], model: Optional[str], pretrained: bool,
                  architecture: Optional[Tuple[int, int, int]]) -> Tuple[str, Optional[str], Optional[str]]:
    """Where the weights of `ESM(path, model, pretrained, architecture)` come from, found without reading them:
    ("random", model name or None for `architecture`, None), ("hugging face", folder, None) or ("fair-esm", folder,
    file stem; ESM C's EvolutionaryScale `.pth` files too). Raises the constructor's one sentence for weights that
    are not there (also called when a config is checked, before anything is built or downloaded)."""
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
                raise ValueError("ESM: random weights are built for ESM-2 and ESM C models; use one of their names.")
            return "random", model, None
        if path is None:
            file = f"{stem}.pth" if family_of_stem(stem) == "ESM C" else f"{stem}.pt (download {URL.format(stem)})"
            raise WeightError(f"ESM: no `path` given for the {model} weights; set `path:` to the folder "
                              f"holding {file} or to a Hugging Face checkpoint folder of it, or `pretrained: false`.")
    else:
        if path is None:
            raise WeightError(f"ESM: no `path` given for the checkpoint {model!r}.")
        stem = model
    _fair_esm_file(path, stem)
    return "fair-esm", path, stem


def family(kind: str, where: Optional[str], stem: Optional[str], model: Optional[str]) -> str:
    """The model family ("ESM-2", "ESM-1b", "ESM C") of a `weight_source` (`kind`, `where`, `stem`), found without
    reading weights (a Hugging Face folder's config.json is read)."""
    if kind == "hugging face":
        return "ESM C" if read_config(os.path.expanduser(str(where)))["model_type"] == "esmc" else "ESM-2"
    return family_of_stem(stem) if stem else family_of_name(model)


def weight_files(path: Optional[str], model: Optional[str], pretrained: bool,
                 architecture: Optional[Tuple[int, int, int]]) -> Tuple[str, List[str]]:
    """(the model's name, the files its weights are read from) for `ESM(path, model, pretrained, architecture)`
    (see `weight_source`): the fair-esm .pt file, a Hugging Face folder's weight file(s), none for random weights."""
    kind, where, stem = weight_source(path, model, pretrained, architecture)
    if kind == "random":
        return where or f"random {family_of_name(model)} {tuple(architecture)}", []
    if kind == "hugging face":
        folder = os.path.expanduser(str(where))
        return model or os.path.basename(os.path.normpath(folder)), hf_weight_files(folder)
    return model or stem, [_fair_esm_file(where, stem)]


def _reads_hugging_face(path: Optional[str], model: Optional[str]) -> bool:
    """Whether `ESM(path, model)` loads a Hugging Face checkpoint: `path` holds config.json and `model` does not
    name a fair-esm file there (fair-esm files keep working exactly as before)."""
    if not is_hf_folder(path):
        return False
    if model is None:
        return True
    stem = ARCHITECTURES[model][0] if model in ARCHITECTURES else model
    try:
        _fair_esm_file(path, stem)
    except WeightError:
        return True
    return False


def _load_hugging_face(path: str, model: Optional[str]):
    """The module and alphabet from a Hugging Face ESM-2 or ESM C folder; `model`, if given, must name its
    architecture."""
    folder = os.path.expanduser(str(path))
    esm_model, alphabet, config = load_hf_esm(folder)
    if model is not None:
        shape = (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"])
        family = "ESM C" if config["model_type"] == "esmc" else "ESM-2"
        names = [name for name, (stem, *dims) in ARCHITECTURES.items()
                 if tuple(dims) == shape and family_of_stem(stem) == family]
        if model not in names:
            found = f"{shape[0]} layers, width {shape[1]}, {shape[2]} heads"
            if model in ARCHITECTURES:
                what = f"is another architecture than the Hugging Face checkpoint in {folder} ({found})"
            else:
                what = f"names no file {model}.pt in {folder}, which holds a Hugging Face checkpoint ({found})"
            fix = f"set `model: {names[0]}` or remove it" if names else "remove `model:`"
            raise WeightError(f"ESM: `model: {model}` {what}; {fix} (config.json decides the architecture).")
    return esm_model, alphabet


def load(path: Optional[str], model: Optional[str], pretrained: bool, architecture: Optional[Tuple[int, int, int]],
         vocabulary: Optional[str] = None):
    """The fair-esm module and alphabet that `ESM(path, model, pretrained, architecture, vocabulary)` reads (see
    `ESM` for how `path` and `model` decide); one sentence for weights that are not there or not what
    `vocabulary` names."""
    if vocabulary is not None and vocabulary not in VOCABULARIES:
        raise ValueError(f"ESM: unknown vocabulary {vocabulary!r}; choose one of {', '.join(VOCABULARIES)}.")
    kind, where, stem = weight_source(path, model, pretrained, architecture)
    if kind == "random" and family_of_name(model) == "ESM C":
        esm_model, alphabet = build_esmc(*(architecture or ARCHITECTURES[where][1:]))
    elif kind == "random":
        if vocabulary == "ESM C":
            raise ValueError("ESM: `vocabulary: ESM C` is ESM C's own; name an ESM C model with it (`model: "
                             "ESM-C-300M` or ESM-C-600M).")
        random_alphabet = VOCABULARIES[vocabulary]() if vocabulary is not None else None
        esm_model, alphabet = build_esm2(*(architecture or ARCHITECTURES[where][1:]), alphabet=random_alphabet)
    elif kind == "hugging face":
        esm_model, alphabet = _load_hugging_face(where, model)
    elif family_of_stem(stem) == "ESM C":
        esm_model, alphabet = load_release(_fair_esm_file(where, stem))
    else:
        esm_model, alphabet = load_esm_model(where, stem)
    if vocabulary is not None and list(alphabet.all_toks) != list(VOCABULARIES[vocabulary]().all_toks):
        source = f"the weights loaded from {path}" if kind != "random" else f"the random {family_of_name(model)} model"
        raise WeightError(f"ESM: `vocabulary: {vocabulary}` was asked for, but {source} has another vocabulary "
                          f"({len(alphabet.all_toks)} tokens); point `path` at a {vocabulary} checkpoint or remove "
                          "`vocabulary:`.")
    return esm_model, alphabet
