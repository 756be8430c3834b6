"""`esm-gearnet embed`: per-protein (and per-residue) embeddings of your own structures (.npz, .pt or .h5); of a
FoldComp database, or of any input under `torchrun`, a folder of shards (`commands.embed_scale`).

```
esm-gearnet embed -c CONFIG [--ckpt PATH] INPUT... -o OUT.npz [--per-residue] [--resume]
torchrun --nproc_per_node=N script/embed.py -c CONFIG [--ckpt PATH] DB -o OUT/ [--shard-size K] [--format npz|h5]
```
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .. import checkpoint, writing
from .arguments import embed_parser, parse_args
from .embed_scale import is_sharded, run_sharded
from .encoding import embed_proteins, embedding_options, load_encoder
from .exits import one_sentence
from .inputs import load_run, output_file, read_inputs, write_skipped
from .shards import ShardedEmbeddings

logger = logging.getLogger("esm_gearnet")
FORMATS = (".npz", ".pt", ".h5")


@one_sentence
def main(argv: Optional[List[str]] = None) -> int:
    from .run import setup_logging

    args, variables, overrides = parse_args(argv, embed_parser())
    setup_logging(None)
    if is_sharded(args.inputs):
        result = run_sharded(args.inputs, args.output, args.config, args.ckpt, args.per_residue, args.resume,
                             args.workers, args.device, args.max_residues, progress=not args.quiet,
                             variables=variables, overrides=overrides, shard_size=args.shard_size, fmt=args.format,
                             precision=args.precision)
        if result["rows"] is None:  # a rank other than 0: rank 0 says what the output holds
            return 0
        skipped = len(result["skipped"])
        print(f"embedded {result['embedded']} protein(s) into {args.output} ({result['rows']} in its "
              f"{result['shards']} shard(s)); {skipped} entr{'y' if skipped == 1 else 'ies'} skipped")
        return 0 if result["rows"] or not skipped else 1
    if args.shard_size is not None or args.format is not None:
        raise ValueError(f"--shard-size and --format apply to a folder of shards (a FoldComp database as input, or "
                         f"a run under torchrun); the suffix of -o {args.output} chooses a single file's format.")
    count, skipped = run_embed(args.inputs, args.output, args.config, args.ckpt, args.per_residue, args.resume,
                               args.workers, args.device, args.max_residues, progress=not args.quiet,
                               variables=variables, overrides=overrides, precision=args.precision)
    print(f"embedded {count} protein(s) into {args.output}; {len(skipped)} input(s) skipped")
    return 0 if count or (args.resume and not skipped) else 1


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


def load_embeddings(path: Path) -> Union[Dict, ShardedEmbeddings]:
    """The records `save_embeddings` wrote (embedding as a tensor, per-residue as a list of tensors); of a folder
    of shards, a `ShardedEmbeddings`: its names and memory-mapped embeddings as one table, read lazily.

    Raises:
        ValueError: one sentence naming the file when it cannot be read (truncated, not written by embed).
    """
    path = Path(path)
    if path.is_dir():
        return ShardedEmbeddings(path)
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
              overrides: Sequence = (), precision: str = "fp32") -> Tuple[int, List[Tuple[str, str]]]:
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
        return _embed(inputs, output, cfg, state, ckpt, per_residue, resume, workers, device, max_residues, progress,
                      precision)


def _embed(inputs, output, cfg, state, ckpt, per_residue, resume, workers, device, max_residues, progress,
           precision) -> Tuple[int, List[Tuple[str, str]]]:
    encoder = load_encoder(cfg, state, str(ckpt))
    options = embedding_options(cfg, encoder, per_residue, precision)
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
    embedding, residue = embed_proteins(encoder, proteins, per_residue, device, max_residues, progress, precision)
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
