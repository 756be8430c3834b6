"""From a config to objects: the one place where the original's config layout meets the encoder contract.

=============================================================  ===================================================
the original's config                                          what it becomes
=============================================================  ===================================================
task.model (FusionNetwork, GearNet, GVPGNN, CDConv, ESM)       the task's encoder (`models.Encoder`)
task.graph_construction_model                                  that encoder's graph construction
task: {class: Unsupervised, model: {class: MultiviewContrast,  the `MultiviewContrast` task over the encoder X
       model: X, crop_funcs, noise_funcs, ...}}
the rest of task                                               the task's head and options
structure_model.input_dim (GVPGNN: node_in_dim[0])             derived: ESM's width in series fusion, else 21
num_relation (GearNet)                                         derived from the graph construction's edge layers
lr_ratio, sequence_model_lr_ratio, fix_sequence_model          learning-rate ratios of the encoder's parameter
                                                               groups; ratio 0 freezes the group
lora_lr_ratio (this framework's)                               the ratio of an ESM's LoRA adapters (`lora:`)
=============================================================  ===================================================

A derived size that the config also gives must agree with it; otherwise one sentence names the key.
Everything else (training, pre-training, embed, predict, tests, benchmarks) builds tasks and encoders through
`build_task` / `build_encoder` and never looks inside a config's model layout.
"""
from __future__ import annotations

import copy
import inspect
from contextlib import nullcontext
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .. import checkpoint
from ..config import ConfigError
from ..engine.selection import lower_is_better
from ..engine.stepper import Scheduler
from ..models import Encoder, FusionNetwork, StructureEncoder
from ..models.encoder import ONE_HOT_DIM
from ..registry import build, check, names_of, resolve
from ..tasks import MultipleBinaryClassification, Task

UNSUPERVISED = "Unsupervised"  # the original's wrapper around MultiviewContrast


def model_config(cfg) -> Tuple[Dict[str, Any], str]:
    """(the encoder's config, its key path): `task.model`, or `task.model.model` in the Unsupervised layout."""
    task = cfg.get("task") or {}
    if not task.get("model"):
        raise ConfigError("the config has no task.model; it names the encoder (FusionNetwork, GearNet, ...), "
                          "as config/EC/esm_gearnet.yaml does.")
    if task.get("class") == UNSUPERVISED:
        if not isinstance(task.model, dict) or not task.model.get("model"):
            raise ConfigError("task.model of an Unsupervised task must be a MultiviewContrast with its own model: "
                              "(the encoder), as config/pretrain/mc_esm_gearnet.yaml has.")
        return task.model.model, "task.model.model"
    return task.model, "task.model"


def _derive(config: Dict[str, Any], key: Sequence, value: int, path: str, source: str,
            fill: Callable[[int], Any] = lambda value: value) -> Dict[str, Any]:
    """A copy of `config` with the size at `key` (a key, or a key and a list index) set to `value` (an absent key
    becomes `fill(value)`); a config value that disagrees ends in one sentence."""
    config = copy.deepcopy(dict(config))
    name, *index = key
    given = config.get(name)
    if index and given is not None:
        given = list(given)
        if given[index[0]] != value:
            raise ConfigError(f"config key `{path}.{name}` is {config[name]} but {source} gives "
                              f"{value} channels; set {name}[{index[0]}] to {value}.")
        config[name] = given
    elif given is not None and given != value:
        raise ConfigError(f"config key `{path}.{name}` is {given} but {source} gives {value}; "
                          f"remove the key (it is derived) or set it to {value}.")
    elif given is None:
        config[name] = fill(value)
    return config


def _encoder(config: Dict[str, Any], path: str, input_dim: int, num_relation: int,
             graph: Optional[nn.Module] = None, source: str = "the 21-dim one-hot residue input") -> Encoder:
    """Build the encoder a `class:` dict describes, its derivable sizes filled in."""
    if not isinstance(config, dict) or "class" not in config:
        raise ConfigError(f"config key `{path}` must be a mapping with a `class:` entry (the encoder).")
    cls = resolve(config["class"], path)
    if not (inspect.isclass(cls) and issubclass(cls, Encoder)):
        raise ConfigError(f"config key `{path}`: {config['class']} is not an encoder; use one of "
                          f"{', '.join(names_of(Encoder))}.")
    runtime = {"graph_construction_model": graph} if graph is not None else {}
    if issubclass(cls, FusionNetwork):
        missing = [k for k in ("sequence_model", "structure_model") if not config.get(k)]
        if missing:
            raise ConfigError(f"config key `{path}`: FusionNetwork needs {' and '.join(missing)}.")
        fusion = FusionNetwork.fusion_mode(config.get("fusion"))
        sequence = _encoder(config["sequence_model"], f"{path}.sequence_model", input_dim, num_relation)
        width = FusionNetwork.structure_input_dim(fusion, sequence.output_dim)
        why = (f"the sequence model ({path}.sequence_model)" if fusion == "series"
               else "the 21-dim one-hot residue input")
        structure = _encoder(config["structure_model"], f"{path}.structure_model", width, num_relation, source=why)
        rest = {k: v for k, v in config.items() if k not in ("sequence_model", "structure_model")}
        return build(rest, path, sequence_model=sequence, structure_model=structure, **runtime)
    if issubclass(cls, StructureEncoder):
        if cls.needs_graph and not num_relation:
            raise ConfigError(f"config key `{path}`: {config['class']} reads the residue graph's edges but the "
                              "config has no task.graph_construction_model with edge layers; add one (see "
                              "config/EC/esm_gearnet.yaml).")
        config = _derive(config, cls.input_dim_key, input_dim, path, source, cls.input_dim_value)
        if cls.relation_key and num_relation:
            config = _derive(config, (cls.relation_key,), num_relation, path,
                             "task.graph_construction_model's edge layers")
    return build(config, path, **runtime)


def learning_rate_ratios(cfg, encoder: Encoder) -> Dict[str, float]:
    """The learning-rate ratio of each of the encoder's parameter groups (0 = frozen), from the config's
    `lr_ratio` (the whole encoder against the head; it wins over the others, as in the original),
    `sequence_model_lr_ratio`, `fix_sequence_model` and `original_optimizer_groups`; with an ESM's `lora:`, its
    adapters are the group "lora", at `lora_lr_ratio` (else at `lr_ratio`, else 1), its base frozen.

    DEVIATION: the original built its optimizer from `sequence_model`, `structure_model` and the head only, so
    cross fusion's `seq_linear`, `struct_linear` and `attn` kept their random initialisation in every
    `*_cross.yaml` run. They train here; `original_optimizer_groups: true` freezes them as the original did.
    """
    groups = encoder.parameter_groups()
    if cfg.get("lr_ratio") is not None:
        ratios = {name: float(cfg.lr_ratio) for name in groups}
    else:
        ratios = {name: 1.0 for name in groups}
        if cfg.get("sequence_model_lr_ratio") is not None:
            ratios["sequence_model"] = float(cfg.sequence_model_lr_ratio)
            if cfg.get("original_optimizer_groups") and "fusion" in groups:
                ratios["fusion"] = 0.0
    if cfg.get("fix_sequence_model"):
        ratios["sequence_model"] = 0.0
    if cfg.get("lora_lr_ratio") is not None:
        if "lora" not in groups:
            raise ConfigError("config key `lora_lr_ratio` sets the learning-rate ratio of LoRA adapters, but the "
                              "task's sequence model has none; add `lora:` to it or remove the key.")
        ratios["lora"] = float(cfg.lora_lr_ratio)
    unknown = [name for name in ratios if name not in groups]
    if unknown:
        raise ConfigError(f"sequence_model_lr_ratio / fix_sequence_model need an encoder with a sequence model "
                          f"(FusionNetwork or ESM); task.model has the parameter groups {', '.join(groups)}. "
                          "Remove the key or use lr_ratio.")
    return ratios


def build_encoder(cfg, state: Optional[Dict[str, torch.Tensor]] = None, source: str = "the checkpoint"
                  ) -> Encoder:
    """The encoder of a config (graph construction attached, sizes derived, frozen groups frozen).

    With `state` (the encoder's state_dict of a checkpoint, read from `source`), its parameters are never
    initialised: the encoder takes the state's tensors (`checkpoint.load_state_dict_checked`, strict)."""
    config, path = model_config(cfg)
    graph_config = cfg.task.get("graph_construction_model")
    graph = build(graph_config, "task.graph_construction_model") if graph_config else None
    with checkpoint.skipping_init() if state is not None else nullcontext():
        encoder = _encoder(config, path, ONE_HOT_DIM, getattr(graph, "num_relation", 0), graph)
    if state is not None:
        checkpoint.load_state_dict_checked(encoder, state, source, assign=True)
    for group, ratio in learning_rate_ratios(cfg, encoder).items():
        if ratio == 0:
            encoder.freeze(group)
    return encoder


def check_task(cfg) -> None:
    """Check the task block's classes, argument names and value types (`registry.check`) without building it."""
    encoder_config, path = model_config(cfg)
    check(encoder_config, path)
    if cfg.task.get("graph_construction_model"):
        check(cfg.task.graph_construction_model, "task.graph_construction_model")
    check(*_head(cfg))


def _head(cfg) -> Tuple[Dict[str, Any], str]:
    """The task's head block (the task without its encoder) and its config path."""
    if cfg.task.get("class") == UNSUPERVISED:
        return _unsupervised_head(cfg), "task.model"
    return {k: v for k, v in cfg.task.items() if k not in ("model", "graph_construction_model")}, "task"


def _unsupervised_head(cfg) -> Dict[str, Any]:
    """The MultiviewContrast head of the original's Unsupervised layout (task.model without its model)."""
    extra = [k for k in cfg.task if k not in ("class", "model", "graph_construction_model")]
    if extra:
        raise ConfigError(f"config key `task`: Unsupervised takes model and graph_construction_model only, "
                          f"not {extra[0]!r}.")
    return {k: v for k, v in cfg.task.model.items() if k != "model"}


def runtime_task_list(cfg, task_names: Sequence[str]) -> List[Any]:
    """What the original filled into `task.task`, from the dataset's task names (`dataset.tasks`, or those a
    checkpoint lists): term indices for multi-label classification (EC, GO), the names otherwise."""
    cls = resolve(cfg.task["class"], "task")
    names = list(task_names)
    return list(range(len(names))) if issubclass(cls, MultipleBinaryClassification) else names


def build_task(cfg, task_list: Optional[Sequence] = None, state: Optional[Dict[str, torch.Tensor]] = None,
               source: str = "the checkpoint", encoder_state: Optional[Dict[str, torch.Tensor]] = None) -> Task:
    """The task of a config: its encoder (`build_encoder`) and head. `task_list` is the runtime `task.task`
    of fine-tuning tasks (see `runtime_task_list`); pre-training objectives take none.

    Weights read from `source`, given as one of:
        state: the task's whole state_dict (`checkpoint.task_state`: --resume, predict): nothing is initialised,
            the task takes its tensors.
        encoder_state: the encoder's state_dict (--ckpt): the encoder is built from it without initialising it
            (`build_encoder`); the head is initialised as without weights.
    """
    if state is not None and encoder_state is not None:
        raise ValueError("build_task takes the task's state or the encoder's, not both.")
    runtime = {"task": list(task_list)} if task_list is not None else {}
    with checkpoint.skipping_init() if state is not None else nullcontext():
        task = build(*_head(cfg), encoder=build_encoder(cfg, encoder_state, source), **runtime)
    if state is not None:
        checkpoint.load_state_dict_checked(task, state, source, assign=True)
    return task


def optimizer_groups(cfg, task: Task, lr: float) -> List[Dict[str, Any]]:
    """Optimizer parameter groups: each trainable encoder group at lr × its ratio, the head at lr. Frozen
    groups (ratio 0) hold no parameter: they get no gradient and no optimizer state."""
    ratios = learning_rate_ratios(cfg, task.encoder)
    groups, seen = [], set()
    for name, parameters in task.encoder.parameter_groups().items():
        trainable = [p for p in parameters if p.requires_grad]
        seen.update(id(p) for p in parameters)
        if trainable and ratios[name] != 0:
            groups.append({"params": trainable, "lr": lr * ratios[name]})
    head = [p for p in task.parameters() if p.requires_grad and id(p) not in seen]
    if head:
        groups.append({"params": head, "lr": lr})
    return groups


def build_predictor(cfg, task_names: Sequence[str], state: Optional[Dict[str, torch.Tensor]] = None,
                    source: str = "the checkpoint") -> Task:
    """The task of a fine-tuning run for `predict`, from the target names its checkpoint lists: one that predicts a
    row per protein (`Task.predicts_proteins`); another is refused in one sentence."""
    if not getattr(resolve(cfg.task["class"], "task"), "predicts_proteins", False):
        kinds = [name for name in names_of(Task) if resolve(name).predicts_proteins]
        raise ValueError(f"predict handles tasks that predict one row per protein ({', '.join(kinds)}); this "
                         f"checkpoint's task is {cfg.task['class']}.")
    return build_task(cfg, runtime_task_list(cfg, task_names), state, source)


def build_optimizer(cfg, task: Task):
    """The config's optimizer over `optimizer_groups` at its `lr` (default 1e-3)."""
    lr = float(cfg.optimizer.get("lr", 1e-3))
    return build(cfg.optimizer, "optimizer", params=optimizer_groups(cfg, task, lr))


def selection_metric(cfg, task: Task) -> str:
    """The validation metric that picks the best epoch and drives the scheduler: `metric:`, else the task's
    first. A `metric:` the task does not report is refused here, before any training."""
    names = task.metric_names()
    if cfg.get("metric") is None:
        return names[0] if names else next(iter(task.metric))
    if names is not None and cfg.metric not in names:
        raise ConfigError(f"config key `metric`: {type(task).__name__} reports no {cfg.metric!r}; its validation "
                          f"metrics are {', '.join(names)}.")
    return cfg.metric


def build_scheduler(cfg, optimizer, metric: str) -> Optional[Scheduler]:
    """The config's scheduler (None without one) and how it is stepped: on the validation score when its `step`
    takes `metrics` (ReduceLROnPlateau), then in the direction of `metric` unless the config sets `mode`, else
    once per epoch."""
    if cfg.get("scheduler") is None:
        return None
    cls = resolve(cfg.scheduler["class"], "scheduler")
    on_score = "metrics" in inspect.signature(cls.step).parameters
    options = {}
    if on_score and "mode" not in cfg.scheduler and "mode" in inspect.signature(cls).parameters:
        # DEVIATION: the original built ReduceLROnPlateau in its default "min" mode and stepped it on f1_max,
        # which it wants to maximise, so the rate fell while the metric improved; the mode follows the metric.
        options["mode"] = "min" if lower_is_better(metric) else "max"
    return Scheduler(build(cfg.scheduler, "scheduler", optimizer=optimizer, **options), on_score)


__all__ = ["build_encoder", "build_optimizer", "build_predictor", "build_scheduler", "build_task", "check_task",
           "learning_rate_ratios", "model_config", "optimizer_groups", "runtime_task_list", "selection_metric"]
