"""`esm-gearnet consolidate PATH [-o FILE]`: a sharded checkpoint (a folder `engine.strategy: fsdp` wrote in place
of best.pth, last.pth or model_epoch_N.pth) as one file of this framework's layout, for sharing, or with
`--encoder-only` as the original's bare state_dict of its encoder. `embed`, `predict` and `--ckpt` read the folders
directly; this is for everything else.

The file holds the weights and the run's config, target names and epoch, no training state (the optimizer's
state is kept per parameter name in the shards; `--resume` continues from the folder itself)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import torch

from .. import checkpoint
from ..writing import replacing
from .arguments import consolidate_parser
from .exits import one_sentence


def consolidate(path, output=None, encoder_only: bool = False) -> Path:
    """Write the sharded checkpoint `path` (or a run directory's best.pth, else last.pth) as one file.

    Args:
        output: the file to write (default: beside the folder, NAME-consolidated.pth).
        encoder_only: write the encoder's bare state_dict (the original's layout) instead of this framework's.
    Returns:
        the file written.
    Raises:
        CheckpointError: a path that is not a sharded checkpoint, or one whose shards are missing or damaged (one
            sentence; nothing is written).
    """
    folder = checkpoint.locate(path)
    if not folder.exists():
        raise checkpoint.CheckpointError(f"{folder} does not exist; give a run directory or its best.pth / last.pth.")
    if not checkpoint.is_folder(folder):
        raise checkpoint.CheckpointError(f"{folder} is not a sharded checkpoint (a folder holding "
                                         f"{checkpoint.FOLDER_META}, written under engine.strategy: fsdp); a .pth "
                                         "file is already one file.")
    state = checkpoint.load(folder)
    output = Path(output) if output else folder.parent / f"{folder.stem}-consolidated.pth"
    content = state["encoder"] if encoder_only else {**{k: v for k, v in state.items() if k != "sharded"},
                                                     "training": None}
    if encoder_only:
        with replacing(output) as temporary, open(temporary, "wb") as handle:
            torch.save(content, handle)
    else:
        checkpoint.save_atomic(content, output)
    return output


@one_sentence
def main(argv: Optional[List[str]] = None) -> int:
    args = consolidate_parser().parse_args(argv)
    written = consolidate(args.path, args.output, args.encoder_only)
    print(f"wrote {written}")
    return 0


__all__ = ["consolidate", "main"]
