"""Model FLOPs of ESM-2 (and ESM C) over sequences: the numerator of every ESM MFU figure
(benchmarks/esm_attention.py, train_step.py, embed.py).

Per token and layer, the dense parts are 12 width^2 parameters (attention projections 4 width^2, feed-forward
8 width^2; ESM C's SwiGLU feed-forward 3 width F, F = 8/3 width rounded up to 256), 2 FLOPs each, and attention
over the token's own sequence of n tokens is 4 width n (scores and the weighted sum); embeddings and heads are
left out. Forward + backward is 3x the forward. Padding is never counted: a padded and an unpadded path are
credited the same FLOPs for the same proteins.
"""
from typing import Iterable, Tuple


def esm_flops(architecture: Tuple[int, int, int], lengths: Iterable[int], backward: bool = False,
              family: str = "ESM-2") -> float:
    """FLOPs of ESM-2 or ESM C (`architecture` = layers, width, heads) over sequences of `lengths` tokens each."""
    layers, width, _ = architecture
    if family == "ESM C":
        from esm_gearnet.models.esm.esmc import hidden_width

        dense = 4 * width * width + 3 * width * hidden_width(width)
    else:
        dense = 12 * width * width
    forward = sum(n * layers * (2 * dense + 4 * width * n) for n in lengths)
    return 3 * forward if backward else forward
