"""`esm-gearnet plan`: the memory each GPU needs to train a config under `ddp`, `fsdp`, `fsdp` + activation
checkpointing and LoRA, and which of them fit.

    esm-gearnet plan -c CONFIG --gpus N --gpu-memory GiB [--length L] [--lora-rank R] [--json] [--KEY.PATH VALUE ...]

The task is built from the config on the `meta` device: shapes only, no memory, no weight file read (ESM-2 15B
costs nothing). A pretrained ESM is built as the architecture its name gives (`models.esm.architecture`), or its
Hugging Face folder's config.json when only that is named; its LoRA block (`sequence_model.lora`) is read, not built.
Counts: P parameters, T the trainable ones (those the optimizer holds: `assembly.optimizer_groups`), W = --gpus.
Every figure is per GPU.

Rules:

- **Parameters** are fp32 (4 B) under every precision. `engine.precision: bf16` under `ddp` is autocast: the
  forward pass runs in bf16 from fp32 weights, and the bf16 copy of every weight a layer on the gradient path runs
  with is kept for its backward pass (2 B each, counted with the activations; a checkpointed layer's only while it
  is recomputed). Under `fsdp`, FSDP2's `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)` keeps the
  sharded parameters fp32 too and gathers a unit's in bf16 when it runs (the head's units stay fp32, as
  `sharding.shard` makes them).
- **Gradients** are fp32, 4 B per trainable parameter. **Optimizer state** is fp32, per trainable parameter:
  Adam, AdamW, Adamax, NAdam, RAdam 8 B (two moments; amsgrad 12), SGD 4 B with momentum and 0 without, RMSprop
  4 B (+4 momentum, +4 centered), Adagrad 4 B, Adadelta 8 B; another optimizer is counted as 8 B. The step's
  temporaries: on CUDA torch's foreach implementation makes one fp32 copy of the largest parameter group (Adam's
  denominator; another with Adam's weight_decay); on the CPU it works tensor by tensor (two copies of the largest).
- **Frozen parameters** (`fix_sequence_model`, a learning-rate ratio of 0, ESM's unused language-model head,
  LoRA's base weights) have no gradient and no optimizer state. A frozen ESM runs without autograd: it keeps no
  activations, only its output features and, while it runs, one layer's working set.
- **ddp** holds everything whole on every GPU; with W > 1 DDP's communication buckets hold a second copy of the
  gradients (4 B per trainable parameter: `gradient_as_bucket_view` is off).
- **fsdp** (W > 1) holds 1/W of the parameters, gradients and optimizer state, plus, gathered whole: the root unit
  (what no other unit holds: ESM's embeddings, its last layer norm and unused heads, cross fusion's block; FSDP2
  keeps the root gathered from the forward pass to the backward), the largest other unit twice (the one running
  and the next, prefetched), and in the backward pass that unit's unsharded gradients (in the gathering dtype, plus
  an fp32 copy to reduce when that is bf16). The units are those `sharding.shard` makes: each transformer layer of
  ESM, the structure encoder, each module of the head. With W = 1 `fsdp` is the plain run.
- **LoRA** (`sequence_model.lora: {rank, alpha, dropout, targets}`; --lora-rank and q, k, v, out projections when
  the config has none): ESM's weights frozen, rank x (in + out) adapter parameters per target trained (fp32).
- **Activations**, measured per token per layer (`benchmarks/plan_table.py`, pasted below with the command that
  produced it): tokens per GPU are `engine.batch_size` x (length + 2) for ESM (`<cls>`, `<eos>`; windows of 1022
  residues), batch_size x length residues for the structure encoder, twice that where a task encodes two proteins
  or views of each item (MSP, MultiviewContrast, SiamDiff). The length is --length, else the config's
  `TruncateProtein` max_length, else 1022. fair-esm's own attention (`attention: esm`) keeps an H x L matrix per
  token; sdpa and varlen do not. With LoRA dropout, each target keeps its dropped input and mask. The bf16 rows
  were measured under the CPU's autocast, whose lists of ops differ a little from CUDA's; cross fusion's attention
  block is counted as one ESM-2 layer of width `cross_dim` over the 2L tokens it attends over.
- **Peak**: the backward pass frees each unit's activations as it makes that unit's gradients, so its peak is the
  largest, over the units in backward order, of the activations still kept + the gradients made so far + that
  unit's working set; the forward pass's, over the units in order, of the activations kept so far + that unit's
  working set; the optimizer step's is the gradients + its temporaries. With `gradient_interval` > 1 the gradients
  are kept throughout. peak = parameters + optimizer state + DDP's buckets + the largest of the three (with FSDP's
  gathered units in the forward and backward passes).
- **Fits** when the peak is at most 90 % of --gpu-memory: the rest is left to the CUDA context, NCCL's buffers and
  the caching allocator's fragmentation, none of which the tables see.

Not counted: `torch.compile`'s workspaces, the data loader (host memory), a frozen ESM's feature cache (host), the
head's activations (a few values per protein). GearNet-Edge's edge layers are counted as GearNet layers; a structure
encoder without a table row (a plugin) is counted without activations, and the output says so.
"""
from __future__ import annotations

import copy
import inspect
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .arguments import parse_args, plan_parser
from .exits import one_sentence

GIB = 1024 ** 3
HEADROOM = 0.10  # of --gpu-memory, left to the CUDA context, NCCL buffers and the allocator's fragmentation
DEFAULT_LENGTH = 1022  # ESM-2's window: without a TruncateProtein, no window the language model sees is longer
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
TWO_PER_ITEM = ("MSP", "MultiviewContrast", "SiamDiff")  # tasks that encode two proteins (or views) per item

# ---- measured: `python benchmarks/plan_table.py` (CPU; the bf16 rows under CPU autocast), recorded in
# benchmarks/results/plan_table.json. Bytes per token (ESM) or residue (structure encoders), {term: coefficient}:
# D width, HL heads x padded length, RD_in relations x input width, D_out output width, D_same the output width
# where the short cut adds the input, D_in input width, F 1 for the first layer, 1 a constant.
# PLAN TABLE START
# measured by `python benchmarks/plan_table.py` (cpu; ESM-2: 2 x 512 tokens; structure encoders: real
# structures, edges per residue {'GearNet': 16.3, 'GVPGNN': 14.2, 'CDConv': 0.0})
ESM_LAYER = {
    ('fp32', 'full'): {'D': 64.16, '1': -16.0},
    ('fp32', 'checkpoint'): {'D': 4.02, '1': -3.0},
    ('fp32', 'lora'): {'D': 44.22, '1': 381.0},
    ('fp32', 'esm'): {'D': 95.49, 'HL': 4.03, '1': 268.0},
    ('bf16', 'full'): {'D': 40.2, '1': 3.0},
    ('bf16', 'checkpoint'): {'D': 4.09, '1': -25.0},
    ('bf16', 'lora'): {'D': 32.21, '1': 297.0},
    ('bf16', 'esm'): {'D': 56.14, 'HL': 5.99, '1': 311.5},
}
ESM_OUTSIDE = {
    ('fp32', 'full'): {'D': 7.87, '1': 358.0},
    ('fp32', 'checkpoint'): {'D': 7.9, '1': 355.0},
    ('fp32', 'lora'): {'D': 3.46, '1': 91.0},
    ('fp32', 'esm'): {'D': 8.06, '1': -125.5},
    ('bf16', 'full'): {'D': 8.23, '1': -43.0},
    ('bf16', 'checkpoint'): {'D': 7.9, '1': 303.0},
    ('bf16', 'lora'): {'D': -4.62, '1': 2075.0},
    ('bf16', 'esm'): {'D': 8.36, '1': -367.5},
}
ESM_BACKWARD = {
    ('fp32', 'full'): {'D': 16.0, '1': -0.0},
    ('fp32', 'checkpoint'): {'D': 75.92, '1': 36.0},
    ('fp32', 'lora'): {'D': 31.89, '1': -144.0},
    ('fp32', 'esm'): {'D': 48.62, '1': 3665.5},
    ('bf16', 'full'): {'D': -0.37, '1': 3768.0},
    ('bf16', 'checkpoint'): {'D': 66.72, '1': -4124.0},
    ('bf16', 'lora'): {'D': 15.94, '1': -192.0},
    ('bf16', 'esm'): {'D': 22.25, '1': 8226.0},
}
ESM_FROZEN = {
    'fp32': {'D': 56.0, '1': -136.0},
    'bf16': {'D': 62.08, '1': -7286.0},
}
STRUCTURE_LAYER = {
    ('fp32', 'GearNet'): {'RD_in': 4.07, 'D_out': 11.64, 'D_same': 5.78, '1': 616.11, 'F': -1042.22},
    ('fp32', 'GearNet-no-bn'): {'RD_in': 4.07, 'D_out': 8.0, 'D_same': 1.43, '1': 654.33, 'F': -1129.33},
    ('fp32', 'GVPGNN'): {'D': 589.72, '1': 51811.26, 'F': 10347.94, 'D_in': 8.16},
    ('fp32', 'CDConv'): {'D': 119.76, '1': -4877.12, 'F': 18026.29, 'D_in': 0.96},
    ('bf16', 'GearNet'): {'RD_in': 2.29, 'D_out': 10.07, 'D_same': 1.97, '1': -12.67, 'F': 104.0},
    ('bf16', 'GearNet-no-bn'): {'RD_in': 2.3, 'D_out': 7.72, 'D_same': -1.78, '1': 8.78, 'F': 111.11},
    ('bf16', 'CDConv'): {'D': 65.67, '1': -734.77, 'F': 8746.81, 'D_in': 2.27},
}
STRUCTURE_FORWARD = {
    ('fp32', 'GearNet'): {'RD_in': 4.06, '1': -4633.13},
    ('fp32', 'GearNet-no-bn'): {'RD_in': 3.94, '1': -2214.98},
    ('fp32', 'GVPGNN'): {'D_in': 0.0, 'D': 33.42, '1': 6104.15},
    ('fp32', 'CDConv'): {'D_in': -0.0, 'D': 4.0, '1': -50.67},
    ('bf16', 'GearNet'): {'RD_in': 5.7, '1': -3307.78},
    ('bf16', 'GearNet-no-bn'): {'RD_in': 5.59, '1': -1410.7},
    ('bf16', 'CDConv'): {'D_in': 0.04, 'D': -9.08, '1': 6181.46},
}
STRUCTURE_BACKWARD = {
    ('fp32', 'GearNet'): {'RD_in': 4.69, '1': -2544.19},
    ('fp32', 'GearNet-no-bn'): {'RD_in': 4.57, '1': -102.52},
    ('fp32', 'GVPGNN'): {'D_in': -3.14, 'D': 31.39, '1': 6404.7},
    ('fp32', 'CDConv'): {'D_in': 0.0, 'D': 31.2, '1': 752.0},
    ('bf16', 'GearNet'): {'RD_in': 4.51, '1': -3822.44},
    ('bf16', 'GearNet-no-bn'): {'RD_in': 4.39, '1': -1925.37},
    ('bf16', 'CDConv'): {'D_in': 0.02, 'D': 2.82, '1': 4649.46},
}
# PLAN TABLE END

#: bytes of optimizer state per trainable parameter, by optimizer class (options that add a buffer: below)
OPTIMIZER_STATE = {"Adam": 8, "AdamW": 8, "Adamax": 8, "NAdam": 8, "RAdam": 8, "Adadelta": 8, "SGD": 0,
                   "RMSprop": 4, "Adagrad": 4, "SparseAdam": 8}


@dataclass
class Unit:
    """One part of the model as the plan sees it: a unit of FSDP (the root holds what no other unit does), its
    parameters and, per scenario, what it keeps for the backward pass. Units are in the order the forward pass runs
    them."""
    name: str
    kind: str  # "root", "esm_layer", "structure", "head" or "other"
    parameters: int
    trainable: int
    esm_trainable: int = 0  # of `trainable`, ESM's own (frozen under LoRA)
    runs: bool = True  # an ESM layer above repr_layer never runs
    activation: float = 0.0  # bytes kept for the backward pass
    forward_work: float = 0.0  # bytes above those while its forward pass runs
    backward_work: float = 0.0  # bytes above those while its backward pass runs
    cast: int = 0  # parameters autocast copies to 16 bits and keeps for the backward pass (ddp, bf16)

    @property
    def gather_fp32(self) -> bool:
        """FSDP gathers the head's units in fp32 whatever the precision (`sharding.shard`)."""
        return self.kind == "head"


@dataclass
class Model:
    """What the plan reads from the task a config builds (on the meta device)."""
    description: str
    units: List[Unit]
    groups: List[Tuple[int, int]]  # (trainable parameters, of which ESM's) of each optimizer group
    largest_tensor: int  # the largest trainable parameter tensor (the CPU optimizer step's temporaries)
    esm: Optional[Dict[str, Any]] = None  # layers run, width, heads, attention, checkpointing, frozen, lora
    structure: Optional[Dict[str, Any]] = None  # class, and its widths
    cross_dim: Optional[int] = None
    passes: int = 1
    notes: List[str] = field(default_factory=list)


@one_sentence
def main(argv: Optional[List[str]] = None) -> int:
    args, variables, overrides = parse_args(argv, plan_parser())
    if args.config is None:
        raise ValueError("give the config to plan with -c CONFIG.")
    if args.gpus < 1:
        raise ValueError(f"--gpus must be at least 1, got {args.gpus}.")
    if not args.gpu_memory > 0:
        raise ValueError(f"--gpu-memory must be a positive number of GiB, got {args.gpu_memory:g}.")
    if args.length is not None and args.length < 1:
        raise ValueError(f"--length must be at least 1 residue, got {args.length}.")
    if args.lora_rank < 1:
        raise ValueError(f"--lora-rank must be at least 1, got {args.lora_rank}.")
    cfg = load_plan_config(args.config, variables, overrides)
    result = estimate(cfg, args.gpus, args.gpu_memory, args.length, args.lora_rank)
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0


def load_plan_config(path: str, variables: Optional[Dict[str, Any]] = None, overrides: Sequence = ()):
    """The config as a run renders it: its Jinja variables and key overrides applied."""
    from ..config import load_config

    return load_config(path, variables, overrides)


# ---- the model, built on the meta device ------------------------------------------------------------------------
def _esm_architecture(config: Dict[str, Any], path: str) -> Dict[str, Any]:
    """A copy of an ESM `class:` config that builds the same architecture with random weights (`pretrained:
    false`), so that no weight file is read; its `lora` block removed (the plan counts the adapters itself)."""
    from ..models.esm.architecture import ARCHITECTURES, DEFAULT_MODEL, family_of_name
    from ..models.esm.hugging_face import is_hf_folder

    config = copy.deepcopy(dict(config))
    config.pop("lora", None)
    family = family_of_name(config.get("model"))
    if family != "ESM-2":
        raise ValueError(f"config key `{path}.model`: plan covers ESM-2 models (their layers' activations are "
                         f"measured), not {family}{' yet' if family == 'ESM C' else ''}.")
    if config.get("architecture") is not None or config.get("pretrained") is False:
        return config
    model, folder = config.get("model"), config.get("path")
    stem = ARCHITECTURES[model][0] if model in ARCHITECTURES else model
    where = os.path.expanduser(str(folder)) if folder is not None else None
    has_file = where is not None and stem is not None and os.path.isfile(os.path.join(where, f"{stem}.pt"))
    if not has_file and where is not None and is_hf_folder(where):
        # a Hugging Face folder: its config.json decides the architecture (read; the weights are not)
        with open(os.path.join(where, "config.json")) as handle:
            hf = json.load(handle)
        if hf.get("model_type") == "esmc":
            raise ValueError(f"config key `{path}.path`: {folder} holds an ESM C model; plan covers ESM-2 models "
                             "(their layers' activations are measured), not ESM C yet.")
        config["architecture"] = [hf["num_hidden_layers"], hf["hidden_size"], hf["num_attention_heads"]]
        if hf.get("vocab_size", 33) > 33 and not config.get("vocabulary"):
            config["vocabulary"] = "SaProt"
        config.pop("model", None)
    elif model is None and config.get("vocabulary") == "SaProt":
        raise ValueError(f"config key `{path}.path`: {folder} holds no Hugging Face checkpoint here, so the "
                         f"architecture of this SaProt model is unknown; name it with --{path}.model NAME "
                         f"({', '.join(n for n in ARCHITECTURES if 'ESM-2' in n)}).")
    else:
        name = model or DEFAULT_MODEL
        if name not in ARCHITECTURES:
            by_stem = {stem_: name_ for name_, (stem_, *_) in ARCHITECTURES.items()}
            if name not in by_stem:
                raise ValueError(f"config key `{path}.model`: {name!r} is no architecture plan knows; name one of "
                                 f"{', '.join(ARCHITECTURES)} (--{path}.model NAME).")
            name = by_stem[name]
        config["model"] = name
    config["pretrained"] = False
    config.pop("path", None)
    return config


def _without_weights(node: Any, path: str, found: List[Tuple[str, Dict[str, Any]]]) -> Any:
    """`node` (a config block) with every ESM built as its architecture (`_esm_architecture`); `found` collects
    (key path, that ESM's config as given)."""
    from ..models.esm.encoder import ESM
    from ..registry import resolve

    if isinstance(node, list):
        return [_without_weights(v, f"{path}[{i}]", found) for i, v in enumerate(node)]
    if not isinstance(node, dict):
        return node
    if isinstance(node.get("class"), str):
        try:
            cls = resolve(node["class"], path)
        except ValueError:
            cls = None
        if isinstance(cls, type) and issubclass(cls, ESM):
            found.append((path, dict(node)))
            return _esm_architecture(node, path)
    return {k: _without_weights(v, f"{path}.{k}", found) for k, v in node.items()}


def build_on_meta(cfg):
    """(the task, its optimizer groups' parameters, [(key path, ESM config as given)]), built on the meta device."""
    import easydict
    import torch

    from .. import models, tasks  # noqa: F401  (registers the classes a config names)
    from ..assembly import build_task, optimizer_groups, runtime_task_list
    from ..registry import resolve

    found: List[Tuple[str, Dict[str, Any]]] = []
    cfg = easydict.EasyDict({**copy.deepcopy(dict(cfg)), "task": _without_weights(cfg.get("task"), "task", found)})
    if not isinstance(cfg.get("task"), dict) or not cfg.task.get("class"):
        raise ValueError("the config has no task with a `class:`; plan reads the model from task.model.")
    head = cfg.task.model if cfg.task["class"] == "Unsupervised" else cfg.task  # the original's pre-training layout
    cls = resolve(head.get("class"), "task")
    takes_targets = isinstance(cls, type) and "task" in inspect.signature(cls.__init__).parameters
    # the head's last layer is built for one target: the dataset (not read) says how many there are; the difference
    # is that layer's input width x the targets (under 0.5 % of ESM-2-650M + GearNet for EC's 538)
    with torch.device("meta"):
        task = build_task(cfg, runtime_task_list(cfg, ["target"]) if takes_targets else None)
    groups = optimizer_groups(cfg, task, float((cfg.get("optimizer") or {}).get("lr", 1e-3)))
    return task, [group["params"] for group in groups], found


def _units(task) -> List[Tuple[str, str, Any]]:
    """[(name, kind, module)] of FSDP's units other than the root, in the order the forward pass runs them: those
    `sharding.shard` makes (`Encoder.shard_units`, then `sharding.head_units`)."""
    from .. import sharding
    from ..models.encoder import StructureEncoder
    from ..models.esm.encoder import ESM

    layers = {id(layer) for m in task.modules() if isinstance(m, ESM) for layer in m.model.layers}
    names = {id(m): n for n, m in task.named_modules()}
    units = [(names.get(id(m), type(m).__name__),
              "esm_layer" if id(m) in layers else "structure" if isinstance(m, StructureEncoder) else "other", m)
             for m, _ in task.encoder.shard_units()]
    return units + [(names[id(m)], "head", m) for m in sharding.head_units(task)]


def _lora(esm_config: Dict[str, Any], path: str, default_rank: int) -> Dict[str, Any]:
    """The LoRA settings of an ESM config (`lora:`), or the defaults."""
    given = esm_config.get("lora") or {}
    if not isinstance(given, dict):
        raise ValueError(f"config key `{path}.lora` must be a mapping {{rank, alpha, dropout, targets}}, got "
                         f"{given!r}.")
    targets = given.get("targets") or DEFAULT_TARGETS
    return {"rank": int(given.get("rank", default_rank)), "dropout": float(given.get("dropout") or 0.0),
            "targets": [targets] if isinstance(targets, str) else list(targets), "configured": bool(given)}


def describe(cfg, lora_rank: int = 16) -> Model:
    """The `Model` of a config: its units, parameters and what the activation tables need."""
    from ..models.encoder import StructureEncoder
    from ..models.esm.encoder import ESM
    from ..models.fusion import FusionNetwork
    from ..models.gearnet import GearNet

    task, groups, found = build_on_meta(cfg)
    trained = {id(p) for group in groups for p in group}
    esm = next((m for m in task.modules() if isinstance(m, ESM)), None)
    of_esm = {id(p) for p in esm.parameters()} if esm is not None else set()
    running = {id(layer) for layer in esm.model.layers[:esm.repr_layer]} if esm is not None else set()
    owned: set = set()
    units = [Unit("root", "root", 0, 0)]
    for name, kind, module in _units(task):
        parameters = [p for p in module.parameters() if id(p) not in owned]
        owned.update(id(p) for p in parameters)
        units.append(Unit(name, kind, sum(p.numel() for p in parameters),
                          sum(p.numel() for p in parameters if id(p) in trained),
                          sum(p.numel() for p in parameters if id(p) in trained and id(p) in of_esm),
                          runs=kind != "esm_layer" or id(module) in running))
    rest = [p for p in task.parameters() if id(p) not in owned]
    units[0].parameters = sum(p.numel() for p in rest)
    units[0].trainable = sum(p.numel() for p in rest if id(p) in trained)
    units[0].esm_trainable = sum(p.numel() for p in rest if id(p) in trained and id(p) in of_esm)
    largest = max((p.numel() for p in task.parameters() if id(p) in trained), default=0)
    model = Model("", units, [(sum(p.numel() for p in g), sum(p.numel() for p in g if id(p) in of_esm))
                              for g in groups], largest)
    model.passes = 2 if type(task).__name__ in TWO_PER_ITEM else 1
    if getattr(task, "crop_funcs", None):
        model.notes.append(f"{type(task).__name__} crops its views: give --length the crop's residues (the "
                           "length counted is that of the proteins it is given).")
    parts = []
    if esm is not None:
        path, given = found[0] if found else ("task.model", {})
        layer = esm.model.layers[0]
        linears = {name.split(".")[-1]: (m.in_features, m.out_features) for name, m in layer.named_modules()
                   if hasattr(m, "in_features")}
        lora = _lora(given, path, lora_rank)
        unknown = [t for t in lora["targets"] if t not in linears]
        if unknown:
            raise ValueError(f"config key `{path}.lora.targets`: ESM-2's layers have no projection "
                             f"{', '.join(map(repr, unknown))}; they have {', '.join(sorted(linears))}.")
        lora["per_layer"] = sum(lora["rank"] * sum(linears[t]) for t in lora["targets"])
        lora["target_inputs"] = sum(linears[t][0] for t in lora["targets"])
        frozen = ESM.group in esm.frozen or not any(id(p) in trained for p in esm.parameters())
        model.esm = {"layers": esm.repr_layer, "width": esm.output_dim, "heads": esm.model.attention_heads,
                     "attention": esm.attention, "checkpointing": bool(esm.activation_checkpointing),
                     "frozen": frozen, "lora": lora}
        parts.append(f"{_esm_name(esm)} ({esm.model.num_layers} layers, width {esm.output_dim}"
                     f"{', frozen' if frozen else ''})")
    structure = next((m for m in task.modules() if isinstance(m, StructureEncoder)), None)
    if structure is not None:
        facts: Dict[str, Any] = {"class": type(structure).__name__, "input_dim": structure.input_dim}
        if isinstance(structure, GearNet):
            facts.update(dims=list(structure.dims), relations=structure.num_relation,
                         batch_norm=structure.batch_norms is not None, short_cut=bool(structure.short_cut))
            if structure.num_angle_bin:
                model.notes.append("GearNet-Edge's edge layers are counted as GearNet layers (they are not "
                                   "measured).")
        elif facts["class"] == "GVPGNN":
            facts.update(width=structure.output_dim, layers=len(structure.layers))
        elif facts["class"] == "CDConv":
            facts.update(dims=[[m for m in block.output.modules() if hasattr(m, "out_features")][-1].out_features
                               for block in structure.layers[1::2]])  # each stage's width (two blocks a stage)
        model.structure = facts
        parts.append(f"{facts['class']} ({len(getattr(structure, 'layers', []))} layers, output width "
                     f"{structure.output_dim})")
    fusion = ""
    if isinstance(task.encoder, FusionNetwork):
        fusion = f", {task.encoder.fusion} fusion"
        if task.encoder.fusion == "cross":
            model.cross_dim = task.encoder.seq_linear.out_features
    model.description = f"{type(task).__name__}: {' + '.join(parts) or type(task.encoder).__name__}{fusion}"
    return model


def _esm_name(esm) -> str:
    from ..models.esm.architecture import ARCHITECTURES

    shape = (esm.model.num_layers, esm.output_dim, esm.model.attention_heads)
    names = [name for name, (_, *dims) in ARCHITECTURES.items() if tuple(dims) == shape and "ESM-2" in name]
    return (names[0] if names else "ESM-2") + (" (SaProt vocabulary)" if esm.saprot else "")


# ---- activations --------------------------------------------------------------------------------------------------
def _value(row: Dict[str, float], **terms: float) -> float:
    """A table row's bytes for the given terms (the constant "1" always counts)."""
    return sum(coefficient * (1.0 if term == "1" else terms.get(term, 0.0)) for term, coefficient in row.items())


def _table_precision(precision: str) -> str:
    return "fp32" if precision == "fp32" else "bf16"  # fp16 keeps what bf16 keeps


def esm_activations(esm: Dict[str, Any], precision: str, tokens: int, padded: int, checkpointing: bool,
                    lora: bool) -> Dict[str, float]:
    """Bytes ESM keeps for `tokens` tokens of `padded` padded length (per layer, and outside the layers), and the
    working sets of its forward pass and of one layer's backward pass."""
    p = _table_precision(precision)
    width, heads = esm["width"], esm["heads"]
    if esm["frozen"] and not lora:  # no autograd: its output features, and one layer's working set while it runs
        return {"layer": 0.0, "outside": 4.0 * width * tokens,
                "forward_work": max(_value(ESM_FROZEN[p], D=width), 0.0) * tokens, "backward_work": 0.0}
    mode = "lora" if lora else "esm" if esm["attention"] == "esm" else "full"
    layer = _value(ESM_LAYER[(p, mode)], D=width, HL=heads * padded)
    if lora and esm["lora"]["dropout"] > 0:  # each target keeps its dropped input, and the mask (1 byte)
        layer += ((4 if p == "fp32" else 2) + 1) * esm["lora"]["target_inputs"]
    outside = _value(ESM_OUTSIDE[(p, mode)], D=width)
    backward = _value(ESM_BACKWARD[(p, mode)], D=width)
    if checkpointing and not lora:  # measured as such: the layer's input kept; recomputed in the backward pass
        layer, backward = _value(ESM_LAYER[(p, "checkpoint")], D=width), _value(ESM_BACKWARD[(p, "checkpoint")],
                                                                                  D=width)
    elif checkpointing:  # LoRA's layer kept as its input, recomputed whole in the backward pass
        layer, backward = _value(ESM_LAYER[(p, "checkpoint")], D=width), backward + layer
    # a fitted line can dip below zero far from the widths measured where a figure is near zero: never below
    return {"layer": max(layer, 0.0) * tokens, "outside": max(outside, 0.0) * tokens, "forward_work": 0.0,
            "backward_work": max(backward, 0.0) * tokens}


def structure_activations(facts: Dict[str, Any], precision: str, residues: int, notes: List[str]
                          ) -> Optional[Dict[str, float]]:
    """Bytes the structure encoder keeps (all its layers) and its working sets, for `residues` residues; None for
    an encoder the tables do not have (`notes` gets what the figures leave out)."""
    p = _table_precision(precision)
    name = facts["class"]
    key = name if name != "GearNet" or facts["batch_norm"] else "GearNet-no-bn"
    rows = [STRUCTURE_LAYER.get((p, key)) or STRUCTURE_LAYER.get(("fp32", key)),
            STRUCTURE_FORWARD.get((p, key)) or STRUCTURE_FORWARD.get(("fp32", key)),
            STRUCTURE_BACKWARD.get((p, key)) or STRUCTURE_BACKWARD.get(("fp32", key))]
    if any(row is None for row in rows):
        return None
    if (p, key) not in STRUCTURE_LAYER:
        notes.append(f"{name} has no {p} row (it was not measured under autocast: in this version its "
                     "index_add_ of bf16 messages into fp32 features fails there); its fp32 figures are counted.")
    layer, forward, backward = rows
    if name == "GearNet":
        dims, relations = facts["dims"], facts["relations"]
        kept = sum(_value(layer, RD_in=relations * d_in, D_out=d_out, F=float(i == 0),
                          D_same=d_out if facts["short_cut"] and d_in == d_out else 0.0)
                   for i, (d_in, d_out) in enumerate(zip(dims, dims[1:])))
        first = {"RD_in": relations * dims[0]}
    else:
        dims = facts["dims"] if name == "CDConv" else [facts["width"]] * facts["layers"]
        kept = sum(_value(layer, D=d, F=float(i == 0), D_in=facts["input_dim"] if i == 0 else 0.0)
                   for i, d in enumerate(dims))
        first = {"D_in": facts["input_dim"], "D": dims[0]}
    return {"kept": max(kept, 0.0) * residues, "forward_work": max(_value(forward, **first), 0.0) * residues,
            "backward_work": max(_value(backward, **first), 0.0) * residues}


# ---- the estimate ---------------------------------------------------------------------------------------------------
def optimizer_bytes(cfg) -> Tuple[int, str, float]:
    """(bytes of state per trainable parameter, the optimizer's class, fp32 copies of a parameter group that its
    foreach step makes) for the config's optimizer."""
    options = dict(cfg.get("optimizer") or {})
    name = str(options.get("class", "Adam"))
    state = OPTIMIZER_STATE.get(name, 8)
    if name == "SGD":
        state = 4 if float(options.get("momentum") or 0) > 0 else 0
    if name == "RMSprop":
        state += 4 * (float(options.get("momentum") or 0) > 0) + 4 * bool(options.get("centered"))
    if options.get("amsgrad"):
        state += 4
    copies = 1.0 if state >= 8 else 0.0
    if float(options.get("weight_decay") or 0) > 0 and name != "AdamW":
        copies += 1.0  # the gradient plus the decay, made as a new list
    return state, name, copies


def _length(cfg, length: Optional[int]) -> Tuple[int, str]:
    """(residues per protein, where that figure comes from)."""
    if length is not None:
        return length, "--length"
    found = []

    def walk(node):
        if isinstance(node, dict):
            if node.get("class") in ("TruncateProtein", "TruncateProteinPair") and node.get("max_length"):
                found.append(int(node["max_length"]))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(cfg.get("dataset") or {})
    if found:
        return max(found), "the config's TruncateProtein"
    return DEFAULT_LENGTH, "ESM-2's window (the config has no TruncateProtein; give --length)"


def scenarios(model: Model, checkpointing: bool, lora: bool, strategy: str) -> List[Dict[str, Any]]:
    """The rows: the config under ddp and fsdp, fsdp with activation checkpointing, and (with ESM) LoRA toggled
    under ddp and under fsdp with activation checkpointing."""
    rows = [("ddp", checkpointing, lora), ("fsdp", checkpointing, lora), ("fsdp", True, lora)]
    if model.esm is not None:
        rows += [("ddp", checkpointing, not lora), ("fsdp", True, not lora)]
    unique = []
    for row in rows:
        row = (row[0], row[1] and model.esm is not None, row[2])  # only ESM checkpoints its layers
        if row not in unique:
            unique.append(row)
    return [{"strategy": s, "activation_checkpointing": ac, "lora": lo,
             "configured": (s, ac, lo) == (strategy, checkpointing, lora)} for s, ac, lo in unique]


def estimate(cfg, gpus: int, gpu_memory: Optional[float] = None, length: Optional[int] = None,
             lora_rank: int = 16, device: str = "cuda") -> Dict[str, Any]:
    """The plan of a config for `gpus` GPUs of `gpu_memory` GiB each (the rules: the module docstring), as plain
    data: the model, the batch, and per scenario its bytes per GPU and whether it fits.

    Args:
        device: "cuda" (the plan), or "cpu": what one CPU process needs (everything fp32, the optimizer step
            tensor by tensor), to compare with a step measured on the CPU (`benchmarks/plan_table.py --step`).
    """
    engine = dict(cfg.get("engine") or {})
    precision = str(engine.get("precision") or "fp32") if device == "cuda" else "fp32"
    batch = int(engine.get("batch_size") or 1)
    accumulate = int(engine.get("gradient_interval") or 1) > 1
    model = describe(cfg, lora_rank)
    per_protein, length_source = _length(cfg, length)
    windows = math.ceil(per_protein / 1022)
    padded = min(per_protein, 1022) + 2
    residues = batch * per_protein * model.passes
    tokens = batch * (per_protein + 2 * windows) * model.passes
    state, optimizer, copies = optimizer_bytes(cfg)
    checkpointing = bool(model.esm and model.esm["checkpointing"])
    lora = bool(model.esm and model.esm["lora"]["configured"])
    strategy = str(engine.get("strategy") or "ddp")
    rows = []
    for row in scenarios(model, checkpointing, lora, strategy):
        row.update(_row(model, row, gpus, precision, tokens, residues, padded, state, copies, accumulate, device))
        row["lora_rank"] = model.esm["lora"]["rank"] if row["lora"] else None
        if gpu_memory is not None:
            row["fits"] = bool(row["bytes"]["peak"] <= (1 - HEADROOM) * gpu_memory * GIB)
        rows.append(row)
    esm = {k: v for k, v in model.esm.items() if k != "lora"} if model.esm else None
    return {"model": model.description, "parameters": rows[0]["parameters"],
            "trainable": rows[0]["trainable"], "esm": esm, "structure": model.structure,
            "gpus": gpus, "gpu_memory_gib": gpu_memory,
            "usable_gib": None if gpu_memory is None else round((1 - HEADROOM) * gpu_memory, 2),
            "batch_size": batch, "length": per_protein, "length_source": length_source,
            "proteins_per_item": model.passes, "tokens": tokens, "residues": residues, "precision": precision,
            "optimizer": optimizer, "optimizer_bytes_per_parameter": state, "configured_strategy": strategy,
            "device": device, "rows": rows, "notes": list(dict.fromkeys(model.notes))}


def _row(model: Model, row: Dict[str, Any], gpus: int, precision: str, tokens: int, residues: int, padded: int,
         state: int, copies: float, accumulate: bool, device: str) -> Dict[str, Any]:
    """The bytes per GPU of one scenario (see the module docstring)."""
    sharded = row["strategy"] == "fsdp" and gpus > 1
    lora, checkpointing = row["lora"], row["activation_checkpointing"]
    half = precision != "fp32"
    units = [copy.copy(u) for u in model.units]
    groups = [size for size, _ in model.groups]
    esm = model.esm
    if esm is not None:
        acts = esm_activations(esm, precision, tokens, padded, checkpointing, lora)
        trained_esm = not esm["frozen"] or lora
        for u in units:
            if lora:  # ESM's weights frozen, the adapters trained
                u.trainable -= u.esm_trainable
                if u.kind == "esm_layer":
                    u.parameters += esm["lora"]["per_layer"]
                    u.trainable += esm["lora"]["per_layer"]
            if u.kind == "esm_layer" and u.runs:
                u.activation = acts["layer"]
                u.backward_work = acts["backward_work"]
                # autocast's 16-bit weight copies: kept from the forward pass to the backward (a checkpointed
                # layer's only while it is recomputed)
                if half and not sharded and trained_esm:
                    if checkpointing:
                        u.backward_work += 2 * u.parameters
                    else:
                        u.cast = u.parameters
        units[0].activation += acts["outside"]
        units[0].forward_work = max(units[0].forward_work, acts["forward_work"])
        if lora:
            adapters = esm["lora"]["per_layer"] * sum(u.kind == "esm_layer" for u in units)
            groups = [size - of_esm for size, of_esm in model.groups] + [adapters]
    if model.structure is not None:
        acts = structure_activations(model.structure, precision, residues, model.notes)
        target = next((u for u in units if u.kind == "structure"), None)
        if acts is None:
            model.notes.append(f"{model.structure['class']} has no row in the activation tables: its activations "
                               "are not counted.")
        elif target is not None:
            target.activation = acts["kept"]
            target.forward_work = acts["forward_work"]
            target.backward_work = acts["backward_work"]
            target.cast = target.parameters if half and not sharded else 0
    if model.cross_dim:  # cross fusion's attention block: counted as one ESM-2 layer of its width over 2L tokens
        p = _table_precision(precision)
        units[0].activation += _value(ESM_LAYER[(p, "full")], D=model.cross_dim) * 2 * residues
    parameters = sum(u.parameters for u in units)
    trainable = sum(u.trainable for u in units)
    share = gpus if sharded else 1
    p_bytes = 4 * parameters / share
    o_bytes = state * trainable / share
    grads = [4 * u.trainable / share for u in units]
    g_bytes = sum(grads)
    buckets = 4 * trainable if row["strategy"] == "ddp" and gpus > 1 else 0.0
    kept = [u.activation + 2 * u.cast for u in units]
    gathered = unsharded_grads = 0.0
    if sharded:
        low = 2 if half else 4

        def size(u):
            return u.parameters * (4 if u.gather_fp32 else low)

        gathered = size(units[0]) + 2 * max((size(u) for u in units[1:]), default=0)
        unsharded_grads = max((u.trainable * (4 if u.gather_fp32 else low + (4 if half else 0)) for u in units),
                              default=0)
    # the forward pass, unit by unit: what the units before kept + what this one keeps + its working set
    forward = max(sum(kept[:i + 1]) + u.forward_work for i, u in enumerate(units)) + (g_bytes if accumulate else 0.0)
    # the backward pass, from the last unit to the first: what is still kept + the gradients made + the working set
    backward = max(sum(kept[:i + 1]) + (g_bytes if accumulate else sum(grads[i:])) + u.backward_work
                   for i, u in enumerate(units)) + unsharded_grads
    if device == "cuda":
        temporaries = 4 * copies * max(groups, default=0) / share
    else:
        temporaries = 8 * model.largest_tensor if state else 0
    step = g_bytes + temporaries
    peak = p_bytes + o_bytes + buckets + max(forward + gathered, backward + gathered, step)
    # the most the activations hold at once: at the end of the forward pass, or while a unit's backward pass runs
    activations = max(sum(kept[:i + 1]) + max(u.forward_work, u.backward_work) for i, u in enumerate(units))
    return {"parameters": parameters, "trainable": trainable,
            "bytes": {"parameters": p_bytes, "gradients": g_bytes + buckets, "optimizer": o_bytes,
                      "gathered": gathered + unsharded_grads, "activations": activations, "peak": peak}}


# ---- output -------------------------------------------------------------------------------------------------------
def _gib(value: float) -> str:
    return f"{value / GIB:.1f} GiB" if value >= 0.05 * GIB else f"{value / 1024 ** 2:.0f} MiB" if value else "-"


def _label(row: Dict[str, Any]) -> str:
    label = row["strategy"] + (" + AC" if row["activation_checkpointing"] else "")
    return label + (f" + LoRA r{row['lora_rank']}" if row["lora"] else "")


def render(plan: Dict[str, Any]) -> str:
    """The plan as a table with a few lines around it."""
    millions = plan["parameters"] / 1e6
    lines = [plan["model"],
             f"  {millions:,.1f} M parameters, {plan['trainable'] / 1e6:,.1f} M trained as configured; "
             f"{plan['optimizer']} ({plan['optimizer_bytes_per_parameter']} B of state per trained parameter), "
             f"{plan['precision']}",
             f"  per GPU: batch {plan['batch_size']} x {plan['length']} residues ({plan['length_source']})"
             + (", 2 proteins per item" if plan["proteins_per_item"] == 2 else "")
             + f"; {plan['gpus']} GPU{'s' if plan['gpus'] > 1 else ''}"
             + (f" of {plan['gpu_memory_gib']:g} GiB ({plan['usable_gib']:g} GiB usable: 10 % is left to the CUDA "
                "context, NCCL and fragmentation)" if plan["gpu_memory_gib"] is not None else ""), ""]
    header = ["strategy", "params", "grads", "optimizer", "gathered", "activations", "peak", "fits"]
    table = [header]
    for row in plan["rows"]:
        b = row["bytes"]
        fits = "" if "fits" not in row else "yes" if row["fits"] else "no"
        table.append([_label(row) + (" *" if row["configured"] else ""), _gib(b["parameters"]),
                      _gib(b["gradients"]), _gib(b["optimizer"]), _gib(b["gathered"]), _gib(b["activations"]),
                      _gib(b["peak"]), fits])
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for r in table:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    lines += ["", "* as configured. AC: activation checkpointing of ESM's layers. grads under ddp with several GPUs "
              "include DDP's buckets; gathered: FSDP's whole units (root, two of the largest, one unit's gradients).",
              "peak < the sum of the columns: the backward pass frees activations as it makes gradients "
              "(the rules: docs/scale.md, \"Will it fit?\")."]
    if plan["gpus"] == 1:
        lines.append("fsdp on one GPU is the plain run: nothing is sharded.")
    if plan["precision"] == "fp16":
        lines.append("fsdp refuses fp16 (its loss scaler does not shard): use engine.precision bf16 with fsdp.")
    lines += [f"note: {note}" for note in plan["notes"]]
    return "\n".join(lines)


__all__ = ["describe", "estimate", "load_plan_config", "main", "render"]
