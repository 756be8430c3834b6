"""`esm-gearnet predict`: predictions of a trained task for your own structures (CSV, and the scores as .npz).

```
esm-gearnet predict --ckpt RUN_DIR_OR_CHECKPOINT INPUT... -o predictions.csv [--threshold T] [--scores S.npz]
```
"""
from __future__ import annotations

import csv
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import checkpoint, writing
from ..assembly import build_predictor
from ..data import collate
from ..data.datasets import Proteins
from ..models.esm import merge_lora
from ..registry import build
from .arguments import parse_args, predict_parser
from .exits import one_sentence
from .inputs import (device_of, in_input_order, load_run, output_file, read_inputs,
                     write_skipped)


@one_sentence
def main(argv: Optional[List[str]] = None) -> int:
    from .run import setup_logging

    args, variables, overrides = parse_args(argv, predict_parser())
    setup_logging(None)
    count, skipped = run_predict(args.inputs, args.output, args.ckpt, args.config, args.threshold, args.top,
                                 args.scores, args.workers, args.device, args.max_residues, not args.quiet,
                                 variables=variables, overrides=overrides)
    print(f"predicted {count} protein(s) into {args.output}; {len(skipped)} input(s) skipped")
    return 0 if count else 1


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
    names = list(state["task_names"])
    if not names:
        raise ValueError(f"{ckpt}: the checkpoint lists no task names; predict needs a fine-tuning checkpoint.")
    task = build_predictor(cfg, names, checkpoint.task_state(state), str(ckpt))
    merge_lora(task)  # LoRA adapters folded into their base weights: the same scores at the base model's cost
    device = device_of(device)
    task.to(device).eval()
    transform = cfg.dataset.get("transform")
    proteins, kept, skipped = read_inputs(inputs, workers, progress)
    # the proteins as the run's dataset fed them: through its transform, once
    dataset = Proteins(proteins, build(transform, "dataset.transform") if transform else None)
    items = [dataset[i] for i in range(len(dataset))]
    values = in_input_order(lambda batch: {"scores": task.scores(task.predict(batch))}, items,
                            [item["graph"].num_residue for item in items], collate, device, max_residues)
    matrix = torch.stack([value["scores"] for value in values]) if values else torch.zeros(0, len(names))
    header, cells = task.prediction_columns(matrix, names, threshold, top)
    with writing.replacing(output) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "file", "chains", "length", *header])
        for protein, file, row in zip(proteins, kept, cells):
            writer.writerow([protein.name, file, ",".join(protein.chain_ids), protein.num_residue, *row])
    if scores:
        with writing.replacing(scores) as temporary, open(temporary, "wb") as handle:
            np.savez(handle, ids=np.asarray([p.name for p in proteins], dtype=str),
                     files=np.asarray(kept, dtype=str), terms=np.asarray(names, dtype=str), scores=matrix.numpy())
    write_skipped(output, skipped)
    return len(proteins), skipped
