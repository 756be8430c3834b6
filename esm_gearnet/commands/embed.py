"""Use a model on your own structures: per-protein (and per-residue) embeddings, and predictions of a trained
task. Both read any mix of PDB/mmCIF files (.gz too), folders and text files listing paths; a file that cannot
be read is reported with its reason and skipped.
"""
from __future__ import annotations

import copy
import csv
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from easydict import EasyDict

from .. import checkpoint, writing
from ..assembly.build import build_encoder, build_task, model_config, runtime_task_list
from ..config import apply_overrides, load_config
from ..data import ProteinBatch, collate, load_structures
from ..data.inputs import collect_inputs
from ..models import Encoder
from ..registry import build, resolve
from ..tasks import MultipleBinaryClassification, PropertyPrediction

logger = logging.getLogger("esm_gearnet")
FORMATS = (".npz", ".pt", ".h5")


# ---- inputs -------------------------------------------------------------------------------------------------
def read_inputs(inputs: Sequence, workers: int, progress: bool, exclude=()):
    """(proteins, their files, skipped [(input, reason)]) of the inputs, leaving out files in `exclude`."""
    files, skipped = collect_inputs(inputs)
    files = [f for f in files if str(f) not in exclude]
    proteins, bad = load_structures(files, workers=workers, progress=progress)
    failed = {name for name, _ in bad}
    return proteins, [str(f) for f in files if str(f) not in failed], skipped + bad


def write_skipped(output: Path, skipped: Sequence[Tuple[str, str]]) -> None:
    """`OUT.skipped.tsv`: one row `input<TAB>reason` per skipped input (`writing.write_skipped`)."""
    report = writing.write_skipped(output, skipped)
    if skipped:
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


# ---- models ----------------------------------------------------------------------------------------------
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


def load_encoder(cfg, state: Optional[Dict] = None, source: str = "the checkpoint") -> Encoder:
    """The encoder of a config, in eval mode, with the checkpoint's encoder weights when given."""
    encoder = build_encoder(cfg)
    if state is not None:
        checkpoint.load_state_dict_checked(encoder, checkpoint.encoder_state(state, source), source)
    return encoder.eval()


def weights_digest(module: torch.nn.Module) -> str:
    """Which weights these are: `checkpoint.digest` of the module's state_dict (names, dtypes, shapes, values)."""
    return checkpoint.digest(dict(sorted(module.state_dict().items())))


def _device(device: Optional[str]) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def output_file(path, example: str) -> Path:
    """`-o PATH` as a Path, refused at once (before any work) when it names a directory or a location that takes
    no file (read-only, full: `writing.writable`)."""
    path = Path(os.path.expanduser(str(path)))
    if path.is_dir():
        raise ValueError(f"-o {path} is a directory; name the file to write, e.g. {path / example}.")
    return writing.writable(path)


# ---- embeddings ---------------------------------------------------------------------------------------------
@torch.inference_mode()
def embed_proteins(encoder: Encoder, proteins, per_residue: bool = False, device=None, max_residues: int = 4096,
                   progress: bool = False):
    """([P, D] protein embeddings, per-residue [L_p, D] list or None) in the order of `proteins`; L_p counts the
    residues the encoder's graph construction keeps (all residues with a CA atom)."""
    from tqdm.auto import tqdm

    device = _device(device)
    encoder.to(device)
    graph_out: List[Optional[torch.Tensor]] = [None] * len(proteins)
    residue_out: List[Optional[torch.Tensor]] = [None] * len(proteins)
    batches = list(length_batches([p.num_residue for p in proteins], max_residues))
    for batch_index in tqdm(batches, desc="embedding", disable=not progress, unit="batch"):
        graph = encoder.construct(ProteinBatch.pack([proteins[i] for i in batch_index]).to(device))
        output = encoder.encode(graph)
        graph_feature = output["graph_feature"].float().cpu()
        residue = output["residue_feature"].float().cpu().split(graph.num_residues.tolist()) if per_residue else None
        for k, i in enumerate(batch_index):
            graph_out[i] = graph_feature[k]
            if per_residue:
                residue_out[i] = residue[k]
    embedding = torch.stack(graph_out) if proteins else torch.zeros(0, encoder.output_dim)
    return embedding, (residue_out if per_residue else None)


def embedding_options(cfg, encoder: Encoder, per_residue: bool) -> str:
    """What an embedding file was made with, as JSON: the encoder's weights (sha256), its config (model and
    graph construction) and the options that change what the file holds."""
    model, _ = model_config(cfg)
    graph = cfg.task.get("graph_construction_model")
    config = hashlib.sha256(json.dumps([model, graph], sort_keys=True, default=str).encode()).hexdigest()
    return json.dumps({"encoder_sha256": weights_digest(encoder), "config_sha256": config,
                       "per_residue": bool(per_residue)}, sort_keys=True)


def save_embeddings(path: Path, records: Dict) -> None:
    """Write {"ids", "files", "chains", "sequences", "embedding" [P, D], "options" (JSON text, see
    `embedding_options`), optional "residue_embedding" list} as .npz (numpy only, no pickle: per-residue rows
    concatenated with "residue_offsets"), .pt or .h5."""
    path = Path(path)
    if path.suffix not in FORMATS:
        raise ValueError(f"{path}: choose an output ending in {', '.join(FORMATS)}.")
    residue = records.get("residue_embedding")
    if path.suffix == ".pt":
        with writing.replacing(path) as temporary, open(temporary, "wb") as handle:
            torch.save(records, handle)
        return
    arrays = {key: np.asarray(records[key], dtype=str) for key in ("ids", "files", "chains", "sequences")}
    arrays["embedding"] = records["embedding"].numpy()
    arrays["options"] = np.asarray(records.get("options", ""), dtype=str)
    if residue is not None:
        arrays["residue_embedding"] = (torch.cat(residue).numpy() if residue
                                       else np.zeros((0, arrays["embedding"].shape[1]), np.float32))
        arrays["residue_offsets"] = np.cumsum([0] + [len(r) for r in residue])
    if path.suffix == ".h5":
        try:
            import h5py
        except ImportError:
            raise ImportError("writing .h5 needs h5py (pip install h5py); or write .npz or .pt.") from None
    # a temporary file, then renamed: a killed or failed write leaves the previous file (what --resume reads) whole
    with writing.replacing(path) as temporary:
        if path.suffix == ".npz":
            with open(temporary, "wb") as handle:
                np.savez(handle, **arrays)
        else:
            with h5py.File(temporary, "w") as handle:
                for key, value in arrays.items():
                    handle.create_dataset(key, data=value.astype(object) if value.dtype.kind == "U" else value,
                                          dtype=h5py.string_dtype() if value.dtype.kind == "U" else None)


def load_embeddings(path: Path) -> Dict:
    """The records `save_embeddings` wrote (embedding as a tensor, per-residue as a list of tensors).

    Raises:
        ValueError: one sentence naming the file when it cannot be read (truncated, not written by embed).
    """
    path = Path(path)
    try:
        if path.suffix == ".pt":
            records = torch.load(path, weights_only=True)
            if not (isinstance(records, dict) and {"ids", "files", "embedding"} <= set(records)):
                raise ValueError("it holds no embedding records")
            return records
        if path.suffix == ".npz":
            with np.load(path) as archive:
                data = dict(archive)
        else:
            import h5py
            with h5py.File(path, "r") as handle:
                data = {k: handle[k][()] for k in handle}
            data = {k: (v.decode() if isinstance(v, bytes) else v.astype(str) if v.dtype.kind in "OS" else v)
                    for k, v in data.items()}
        records = {key: [str(x) for x in data[key]] for key in ("ids", "files", "chains", "sequences")}
        records["embedding"] = torch.from_numpy(np.asarray(data["embedding"]))
        records["options"] = str(data["options"]) if "options" in data else ""
        if "residue_embedding" in data:
            offsets, rows = data["residue_offsets"], torch.from_numpy(np.asarray(data["residue_embedding"]))
            records["residue_embedding"] = [rows[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
        return records
    except ImportError:
        raise
    except Exception as error:  # noqa: BLE001 - one sentence for any unreadable file
        reason = checkpoint.first_line(error)
        raise ValueError(f"{path} cannot be read as an embedding file ({reason}): it is truncated or damaged, or "
                         "was not written by embed; it was left as it is: write to a new file, or leave out "
                         "--resume to write it anew.") from None


def run_embed(inputs: Sequence, output, config: Optional[str] = None, ckpt: Optional[str] = None,
              per_residue: bool = False, resume: bool = False, workers: int = 2, device: Optional[str] = None,
              max_residues: int = 4096, progress: bool = True, variables: Optional[Dict] = None,
              overrides: Sequence = ()) -> Tuple[int, List[Tuple[str, str]]]:
    """Embed the inputs into `output`; returns (proteins embedded now, skipped [(input, reason)]). The skipped
    inputs are also listed in `<output>.skipped.tsv`. With `resume`, the proteins already in `output` are kept
    (per-protein and per-residue rows) and only the others are embedded; the file must have been written by the
    same encoder weights, config and options."""
    output = output_file(output, "embeddings.npz")
    if output.suffix not in FORMATS:
        raise ValueError(f"{output}: choose an output ending in {', '.join(FORMATS)}.")
    cfg, state = load_run(config, ckpt, variables, overrides)  # a config or checkpoint fault: nothing is made
    with writing.output_lock(output):  # a second embed into the same file is refused: nothing is lost
        writing.remove_leftovers(output)
        return _embed(inputs, output, cfg, state, ckpt, per_residue, resume, workers, device, max_residues, progress)


def _embed(inputs, output, cfg, state, ckpt, per_residue, resume, workers, device, max_residues, progress
           ) -> Tuple[int, List[Tuple[str, str]]]:
    encoder = load_encoder(cfg, state, str(ckpt))
    options = embedding_options(cfg, encoder, per_residue)
    previous = load_embeddings(output) if resume and output.exists() else None
    if previous is not None and previous["options"] != options:
        theirs = json.loads(previous["options"]) if previous["options"] else {}
        names = {"encoder_sha256": "encoder weights", "config_sha256": "model config",
                 "per_residue": "--per-residue setting"}
        differ = [names[key] for key, value in json.loads(options).items() if theirs.get(key) != value]
        raise ValueError(f"{output} was written with other {' and '.join(differ) or 'options'} than this command's "
                         "(--resume adds only to a file of the same encoder weights, config and --per-residue); "
                         "write to a new file, or leave out --resume to start it anew.")
    done = set(previous["files"]) if previous is not None else set()
    proteins, kept, skipped = read_inputs(inputs, workers, progress, exclude=done)
    # the file's size is known now (floats of the embeddings, before the work; a resumed file is written anew
    # beside the old one): is there room for it?
    rows = len(proteins) + (sum(p.num_residue for p in proteins) if per_residue else 0)
    old_bytes = output.stat().st_size if previous is not None else 0
    writing.writable(output, need_bytes=4 * encoder.output_dim * rows + old_bytes)
    embedding, residue = embed_proteins(encoder, proteins, per_residue, device, max_residues, progress)
    records = {"ids": [p.name for p in proteins], "files": kept, "chains": [",".join(p.chain_ids) for p in proteins],
               "sequences": [p.sequence for p in proteins], "embedding": embedding}
    if per_residue:
        records["residue_embedding"] = residue
    if previous is not None:
        records = {key: (torch.cat([previous[key], records[key]]) if key == "embedding"
                         else list(previous[key]) + list(records[key])) for key in records}
    records["options"] = options
    save_embeddings(output, records)
    write_skipped(output, skipped)
    return len(proteins), skipped


# ---- predictions --------------------------------------------------------------------------------------------
@torch.inference_mode()
def run_predict(inputs: Sequence, output, ckpt: str, config: Optional[str] = None, threshold: float = 0.5,
                top: int = 5, scores: Optional[str] = None, workers: int = 2, device: Optional[str] = None,
                max_residues: int = 4096, progress: bool = True, variables: Optional[Dict] = None,
                overrides: Sequence = ()) -> Tuple[int, List[Tuple[str, str]]]:
    """Predict with a trained task; one CSV row per protein. Returns (proteins predicted, skipped)."""
    output = output_file(output, "predictions.csv")
    if scores:
        scores = output_file(scores, "scores.npz")
    cfg, state = load_run(config, ckpt, variables, overrides)  # a config or checkpoint fault: nothing is made
    with writing.output_lock(output):  # a second predict into the same file is refused: nothing is lost
        for path in filter(None, (output, scores)):
            writing.remove_leftovers(path)
        return _predict(inputs, output, cfg, state, ckpt, threshold, top, scores, workers, device, max_residues,
                        progress)


def _predict(inputs, output, cfg, state, ckpt, threshold, top, scores, workers, device, max_residues, progress
             ) -> Tuple[int, List[Tuple[str, str]]]:
    if not checkpoint.is_packed(state):
        raise ValueError(f"{ckpt} holds no prediction head; predict needs a fine-tuning run directory or its "
                         "best.pth.")
    kind = resolve(cfg.task["class"], "task")
    if not issubclass(kind, (MultipleBinaryClassification, PropertyPrediction)):
        raise ValueError(f"predict handles protein-level tasks (MultipleBinaryClassification, PropertyPrediction); "
                         f"this checkpoint's task is {cfg.task['class']}.")
    names = list(state["task_names"])
    if not names:
        raise ValueError(f"{ckpt}: the checkpoint lists no task names; predict needs a fine-tuning checkpoint.")
    multilabel = issubclass(kind, MultipleBinaryClassification)
    task = build_task(cfg, runtime_task_list(cfg, names))
    checkpoint.load_state_dict_checked(task, checkpoint.task_state(state), str(ckpt))
    device = _device(device)
    task.to(device).eval()
    transform = cfg.dataset.get("transform")
    transform = build(transform, "dataset.transform") if transform else None
    proteins, kept, skipped = read_inputs(inputs, workers, progress)
    items = [{"graph": p} for p in proteins]
    if transform is not None:
        items = [transform(item) for item in items]
    values = [None] * len(items)
    for batch_index in length_batches([item["graph"].num_residue for item in items], max_residues):
        batch = collate([items[i] for i in batch_index])
        batch = {"graph": batch["graph"].to(device)}
        pred = task.predict(batch).float().cpu()
        if multilabel:
            pred = torch.sigmoid(pred)
        for k, i in enumerate(batch_index):
            values[i] = pred[k]
    matrix = torch.stack(values) if values else torch.zeros(0, len(names))
    with writing.replacing(output) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.writer(handle)
        if multilabel:
            writer.writerow(["id", "file", "chains", "length", "top_terms", f"terms_above_{threshold:g}"])
            for protein, file, row in zip(proteins, kept, matrix):
                order = torch.argsort(row, descending=True)
                best = ";".join(f"{names[j]}:{row[j]:.4f}" for j in order[:top].tolist())
                above = ";".join(names[j] for j in order.tolist() if row[j] >= threshold)
                writer.writerow([protein.name, file, ",".join(protein.chain_ids), protein.num_residue, best, above])
        else:
            writer.writerow(["id", "file", "chains", "length", *names])
            for protein, file, row in zip(proteins, kept, matrix):
                writer.writerow([protein.name, file, ",".join(protein.chain_ids), protein.num_residue,
                                 *[f"{v:.6g}" for v in row.tolist()]])
    if scores:
        with writing.replacing(scores) as temporary, open(temporary, "wb") as handle:
            np.savez(handle, ids=np.asarray([p.name for p in proteins], dtype=str),
                     files=np.asarray(kept, dtype=str), terms=np.asarray(names, dtype=str), scores=matrix.numpy())
    write_skipped(output, skipped)
    return len(proteins), skipped
