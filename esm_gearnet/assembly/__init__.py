"""From a config to objects: encoders, tasks, the optimizer and scheduler, and the checks of a config before any is
built."""
from .build import (build_encoder, build_optimizer, build_predictor, build_scheduler, build_task, check_task,
                    learning_rate_ratios, model_config, optimizer_groups, runtime_task_list, selection_metric)
from .schema import validate

__all__ = ["build_encoder", "build_optimizer", "build_predictor", "build_scheduler", "build_task", "check_task",
           "learning_rate_ratios", "model_config", "optimizer_groups", "runtime_task_list", "selection_metric",
           "validate"]
