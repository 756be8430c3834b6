"""What `embed` and `predict` share: the inputs (any mix of PDB/mmCIF files, .gz too, folders and text files
listing paths; a file that cannot be read is reported with its reason in `OUT.skipped.tsv` and skipped), batches
by length, the output file checked before any work, the model's config and checkpoint, the device, and the one
loop that runs a model over the batches (`engine.evaluation`)."""
from __future__ import annotations

from contextlib import nullcontext

import copy
import logging
import os
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from easydict import EasyDict

from .. import checkpoint, writing
from ..config import apply_overrides, load_config
from ..data import load_structures
from ..data.inputs import collect_inputs
from ..engine import evaluation

logger = logging.getLogger("esm_gearnet")


def read_inputs(inputs: Sequence, workers: int, progress: bool, exclude=()):
    """(proteins, their files, skipped [(input, reason)]) of the inputs, leaving out files in `exclude`."""
    files, skipped = collect_inputs(inputs)
    files = [f for f in files if str(f) not in exclude]
    proteins, bad = load_structures(files, workers=workers, progress=progress)
    failed = {name for name, _ in bad}
    return proteins, [str(f) for f in files if str(f) not in failed], skipped + bad


def write_skipped(output: Path, skipped: Sequence[Tuple[str, str]]) -> None:
    """`OUT.skipped.tsv`: one row `input<TAB>reason` per skipped input (`writing.write_skipped`); when none was,
    no report (one an earlier run left is removed)."""
    if not skipped:
        Path(output).with_name(Path(output).name + ".skipped.tsv").unlink(missing_ok=True)
        return
    report = writing.write_skipped(output, skipped)
    logger.warning("%d input(s) skipped, reasons in %s", len(skipped), report)


def length_batches(lengths: Sequence[int], max_residues: int = 4096, max_proteins: int = 32) -> Iterator[List[int]]:
    """Indices grouped into batches of similar length (longest first), each within `max_residues` padded
    residues (B × the longest) and `max_proteins` proteins; a protein longer than the budget is alone."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batch: List[int] = []
    for index in order:
        longest = lengths[batch[0]] if batch else lengths[index]
        if batch and ((len(batch) + 1) * longest > max_residues or len(batch) == max_proteins):
            yield batch
            batch = []
        batch.append(index)
    if batch:
        yield batch


def in_input_order(run: Callable[[Any], Dict[str, Any]], items: Sequence, lengths: Sequence[int],
                   collate: Callable[[Sequence], Any], device: torch.device, max_residues: int = 4096,
                   progress: bool = False, what: str = "predicting",
                   autocast: Callable[[], Any] = nullcontext) -> List[Dict[str, Any]]:
    """`run` over `items` in batches of similar length (`length_batches`, each made by `collate`) through the one
    evaluation loop (`engine.evaluation.outputs`): [each item's share of the outputs] in the order of `items`.
    Outputs are split along their first dimension, per protein; with "num_residues" among them, "residue_feature"
    is split by those counts."""
    from tqdm.auto import tqdm

    order = list(length_batches(lengths, max_residues))
    batches = (collate([items[i] for i in index]) for index in order)
    values: List[Optional[Dict[str, Any]]] = [None] * len(items)
    outputs = tqdm(evaluation.outputs(run, batches, device, autocast), desc=what, total=len(order), disable=not progress,
                   unit="batch")
    for index, output in zip(order, outputs):
        for i, value in zip(index, per_protein(output)):
            values[i] = value
    return values


def per_protein(output: Dict[str, Any]) -> List[Dict[str, Any]]:
    """A batch's outputs as one dict per protein: tensors split along their first dimension; with "num_residues"
    among them, "residue_feature" split by those counts (and "num_residues" left out).

    Args:
        output: {"graph_feature": [B, D], ..., optional "num_residues": [B] and "residue_feature": [N, D]}.
    Returns:
        B dicts {"graph_feature": [D], ..., optional "residue_feature": [L_b, D]}.
    """
    split = {key: value for key, value in output.items() if key not in ("num_residues", "residue_feature")}
    if "residue_feature" in output:
        split["residue_feature"] = output["residue_feature"].split(output["num_residues"].long().tolist())
    count = len(next(iter(split.values()))) if split else 0
    return [{key: value[k] for key, value in split.items()} for k in range(count)]


def load_run(config: Optional[str] = None, ckpt: Optional[str] = None, variables: Optional[Dict] = None,
             overrides: Sequence = ()) -> Tuple[EasyDict, Optional[Dict]]:
    """(config, checkpoint or None). The config is `config` rendered (with `variables`, the defaults training
    used) when given, else the rendered config the checkpoint carries: a run is never rendered again. Key
    `overrides` (`config.apply_overrides`) are set on either."""
    state = checkpoint.load(checkpoint.locate(ckpt)) if ckpt else None
    if config is not None:
        return load_config(str(config), variables, overrides), state
    if state is None:
        raise ValueError("give the model's config with -c CONFIG, or --ckpt with a run directory or checkpoint "
                         "of this framework (they carry their config).")
    if not checkpoint.is_packed(state):
        raise ValueError(f"{ckpt} holds no config (a bare state_dict, like the original's released files); "
                         "give the config of the model it was saved from with -c CONFIG.")
    return EasyDict(apply_overrides(copy.deepcopy(state["config"]), overrides, str(ckpt))), state


def device_of(device: Optional[str]) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def output_file(path, example: str) -> Path:
    """`-o PATH` as a Path, refused at once (before any work) when it names a directory or a location that takes
    no file (read-only, full: `writing.writable`)."""
    path = Path(os.path.expanduser(str(path)))
    if path.is_dir():
        raise ValueError(f"-o {path} is a directory; name the file to write, e.g. {path / example}.")
    return writing.writable(path)
