"""`esm-gearnet embed`: per-protein (and per-residue) embeddings of your own structures (.npz, .pt or .h5).

```
esm-gearnet embed -c CONFIG [--ckpt PATH] INPUT... -o OUT.npz [--per-residue] [--resume]
```
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import checkpoint, writing
from ..assembly import build_encoder, model_config
from ..data import ProteinBatch
from ..models import Encoder
from .arguments import embed_parser, parse_args
from .exits import one_sentence
from .inputs import (device_of, in_input_order, load_run, output_file, read_inputs,
                     write_skipped)

logger = logging.getLogger("esm_gearnet")
FORMATS = (".npz", ".pt", ".h5")


@one_sentence
def main(argv: Optional[List[str]] = None) -> int:
    from .run import setup_logging

    args, variables, overrides = parse_args(argv, embed_parser())
    setup_logging(None)
    count, skipped = run_embed(args.inputs, args.output, args.config, args.ckpt, args.per_residue, args.resume,
                               args.workers, args.device, args.max_residues, progress=not args.quiet,
                               variables=variables, overrides=overrides)
    print(f"embedded {count} protein(s) into {args.output}; {len(skipped)} input(s) skipped")
    return 0 if count or (args.resume and not skipped) else 1


def load_encoder(cfg, state: Optional[Dict] = None, source: str = "the checkpoint") -> Encoder:
    """The encoder of a config, in eval mode, with the checkpoint's encoder weights when given (then built without
    initialising them)."""
    weights = checkpoint.encoder_state(state, source) if state is not None else None
    return build_encoder(cfg, weights, source).eval()


def weights_digest(module: torch.nn.Module) -> str:
    """Which weights these are: `checkpoint.digest` of the module's state_dict (names, dtypes, shapes, values)."""
    return checkpoint.digest(dict(sorted(module.state_dict().items())))


def embed_proteins(encoder: Encoder, proteins, per_residue: bool = False, device=None, max_residues: int = 4096,
                   progress: bool = False):
    """([P, D] protein embeddings, per-residue [L_p, D] list or None) in the order of `proteins`; L_p counts the
    residues the encoder's graph construction keeps (all residues with a CA atom)."""
    device = device_of(device)
    encoder.to(device)

    def run(batch: ProteinBatch):
        graph = encoder.construct(batch)
        output = encoder.encode(graph)
        return {"graph_feature": output["graph_feature"], "num_residues": graph.num_residues,
                **({"residue_feature": output["residue_feature"]} if per_residue else {})}

    values = in_input_order(run, proteins, [p.num_residue for p in proteins], ProteinBatch.pack, device,
                            max_residues, progress, "embedding")
    embedding = torch.stack([v["graph_feature"] for v in values]) if values else torch.zeros(0, encoder.output_dim)
    return embedding, ([v["residue_feature"] for v in values] if per_residue else None)


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
