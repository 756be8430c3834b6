"""The trainer and its parts: one loop for one CPU, one GPU and many GPUs (DDP), with exact resume."""
from .schedule import Stage
from .stepper import Scheduler
from .evaluation import to_device
from .trainer import LOWER_IS_BETTER, Engine, lower_is_better

__all__ = ["Engine", "LOWER_IS_BETTER", "Scheduler", "Stage", "lower_is_better", "to_device"]
