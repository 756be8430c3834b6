"""Which epoch is the best: the direction of a metric and the best validation score so far.

The engine keeps the weights of the epoch selected here (`best.pth`) and reports their test score.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

LOWER_IS_BETTER = ("mae", "rmse", "loss")


def lower_is_better(metric: str) -> bool:
    """Whether smaller values of `metric` are better; the name's first word decides ("rmse [gdt_ts]" -> True)."""
    return metric.split(" ")[0] in LOWER_IS_BETTER


def selection_score(valid: Dict[str, float], metric: str) -> float:
    """The value of `metric` among the validation metrics, or one sentence naming those there are."""
    if metric not in valid:
        raise KeyError(f"metric: {metric!r} is not among the validation metrics ({', '.join(valid)}); "
                       "set `metric:` in the config to one of them.")
    return valid[metric]


class BestEpoch:
    """The epoch with the best validation score so far (ties keep the earlier epoch).

    Its state is the plain dict {"epoch": int or None, "score": float or None} that checkpoints store.
    """

    def __init__(self):
        self.epoch: Optional[int] = None
        self.score: Optional[float] = None

    def update(self, epoch: int, score: float, metric: str) -> bool:
        """Take (epoch, score) if it beats the best so far in the direction of `metric`; returns whether it did."""
        direction = -1.0 if lower_is_better(metric) else 1.0
        if self.score is not None and not direction * score > direction * self.score:
            return False
        self.epoch, self.score = epoch, score
        return True

    def state_dict(self) -> Dict[str, Any]:
        return {"epoch": self.epoch, "score": self.score}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.epoch, self.score = state["epoch"], state["score"]
