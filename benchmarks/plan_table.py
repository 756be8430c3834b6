"""The activation table of `esm-gearnet plan`: the bytes each token keeps for the backward pass, per layer, measured.

    python benchmarks/plan_table.py                      # measure, fit, print the table to paste into plan.py
    python benchmarks/plan_table.py --step -c CONFIG --length L [--KEY.PATH VALUE ...]
                                                         # one real training step: measured peak vs plan's estimate

Each measurement builds the part alone (ESM-2 layers from fair-esm, a GearNet, GVP-GNN or CDConv) with random
weights, and runs a forward pass (a mean-square loss) then a backward pass, ESM on random tokens, the structure
encoders on the largest real structures of ../shared/data (their graphs as real proteins have them), at several
widths and one, then three layers (CDConv: stages), each configuration run once before it is measured. What a
layer keeps for the backward pass is the memory held after the forward pass; each layer's share is the difference
between three layers and one, halved, divided by the tokens (ESM: `<cls>` and `<eos>` included) or residues; what
one layer's run holds beyond that is the part outside the layers. The working sets are the peaks above what is
kept: the forward pass's, and the backward pass's with the parameters' gradients already there. Least squares
then fit each figure, per token: ESM: a·D + b·H·L + c (D the width, H the heads, L the padded length: only
fair-esm's own attention keeps an L x L matrix); GearNet: a·R·D_in + b·D_out + c, plus the short cut's and the
first layer's terms (R relations); GVP-GNN, CDConv: a·D + c, plus the first layer's terms (D the hidden width).

Memory is measured, not counted. On the CPU: the process's resident set (/proc/self/statm), its peak (VmHWM,
reset through /proc/self/clear_refs before each run), with glibc told to map every block of 64 KiB or more on its
own (MALLOC_MMAP_THRESHOLD_, set by re-executing this script) so that a freed tensor leaves the resident set at
once; one thread. On CUDA (--device cuda): torch's allocator statistics. Under bf16 the CPU runs
`torch.autocast("cpu", bfloat16)`, whose lists of ops differ a little from CUDA's (the GPU check may re-measure
with --device cuda); the bf16 copies of the weights that autocast keeps for the backward pass are taken out of each
layer's figure (plan counts them itself: 2 bytes a weight, under ddp).

`--step` runs real training steps of the task a config builds, with the config's optimizer, in this process, on a
batch of `engine.batch_size` synthetic proteins of `--length` residues: a first task's step (what happens once per
process, imports and kernels' caches, is not counted), then two steps of a fresh task, whose second (the optimizer's
state exists, as in every step after the first) is measured as the peak above the memory before that task existed;
it prints that peak next to `esm-gearnet plan`'s estimate for one CPU process (ddp, as configured).
"""
import argparse
import functools
import gc
import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MMAP = "65536"


def _reexec_with_allocator_settings():
    """Run this script again with glibc mapping every block of 64 KiB or more on its own (the setting is read when
    the process starts) and one thread, so that the resident set follows the live tensors."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != MMAP:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=MMAP, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


class ResidentSet:
    """CPU memory: the resident set of this process and its peak since `reset`."""

    def __init__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")

    def current(self) -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * self.page

    def reset(self) -> None:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets VmHWM to the current resident set

    def peak(self) -> int:
        with open("/proc/self/status") as handle:
            return int(re.search(r"VmHWM:\s+(\d+)", handle.read()).group(1)) * 1024


class CudaAllocator:
    """CUDA memory: torch's allocator statistics (bytes of live tensors)."""

    def __init__(self, device):
        import torch

        self.torch, self.device = torch, device

    def current(self) -> int:
        self.torch.cuda.synchronize(self.device)
        return self.torch.cuda.memory_allocated(self.device)

    def reset(self) -> None:
        self.torch.cuda.synchronize(self.device)
        self.torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        self.torch.cuda.synchronize(self.device)
        return self.torch.cuda.max_memory_allocated(self.device)


def meter_of(device):
    return CudaAllocator(device) if device.type == "cuda" else ResidentSet()


def autocast(device, precision):
    import torch

    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def proteins(count: int, length: int, seed: int = 0):
    """`count` synthetic proteins of `length` residues: ideal backbones of helices, strands and loops (extended,
    not packed as real proteins are: fewer spatial edges per residue)."""
    import numpy as np

    from esm_gearnet.data.constants import RESIDUE_LETTERS
    from esm_gearnet.data.synthetic import backbone_protein

    rng = np.random.default_rng(seed)
    pattern = "L" * 3 + "H" * 14 + "L" * 4 + "E" * 7 + "LL" + "E" * 7 + "L" * 3
    made = []
    for i in range(count):
        shift = int(rng.integers(len(pattern)))
        structure = (pattern * (length // len(pattern) + 2))[shift:shift + length]
        sequence = "".join(rng.choice(list(RESIDUE_LETTERS[:20]), length))
        made.append(backbone_protein(sequence, structure, name=f"p{i}"))
    return made


@functools.lru_cache(maxsize=None)
def real_proteins(count: int, length: int):
    """The `count` largest real structures of ../shared/data, each cut to its first `length` residues (the graph of a
    real, packed protein: as many edges per residue as training sees); synthetic ones where the data is absent."""
    import torch

    from benchmarks._common import real_structure_files
    from esm_gearnet import load_structure

    try:
        files = real_structure_files()
    except SystemExit:
        print("  (../shared/data is absent: synthetic proteins, fewer edges per residue than real ones)")
        return proteins(count, length)
    loaded = sorted((load_structure(str(f)) for f in files), key=lambda p: -p.num_residue)[:count]
    return [p.subresidue(torch.arange(min(length, p.num_residue))) for p in loaded]


def run_pass(meter, device, forward, precision, parameters, cast_modules=()):
    """Run `forward()` (returns a tensor) under the precision, then a backward pass of its mean square. The
    trainable parameters' gradients exist (zeros) before: what the backward pass adds above what the forward pass
    kept is its working set (the gradients of the activations), not the parameters' gradients; one weight's
    gradient, made before it is added to the existing one, is taken out of it.

    Returns:
        {"stored": bytes held after the forward pass, without autocast's bf16 weight copies,
        "forward_peak": the forward pass's peak, "backward": the backward pass's peak above "stored", each above
        the memory before}
    """
    import torch

    trainable = [p for p in parameters if p.requires_grad]
    for p in trainable:
        p.grad = torch.zeros_like(p)
    gc.collect()
    base = meter.current()
    meter.reset()
    with autocast(device, precision):
        out = forward()
        loss = out.float().pow(2).mean()
    held = meter.current() - base
    forward_peak = meter.peak() - base
    stored = held
    if precision == "bf16":  # autocast's bf16 copies of the linear layers' weights, kept for the backward pass
        stored -= sum(2 * p.numel() for m in cast_modules for p in m.parameters(recurse=False))
    if loss.requires_grad:
        loss.backward()
    largest = max((p.numel() * p.element_size() for p in trainable), default=0)
    backward = meter.peak() - base - held - largest
    for p in trainable:
        p.grad = None
    del out, loss
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {"stored": stored, "forward_peak": forward_peak, "backward": backward}


# ---- ESM-2 layers -----------------------------------------------------------------------------------------------
def esm_run(meter, device, num_layers, width, heads, batch, length, precision, mode):
    """One measurement of `num_layers` ESM-2 layers on `batch` x `length` tokens (no padding).

    mode: "full" (trained, the sdpa path), "checkpoint" (activation checkpointing), "lora" (base frozen, rank-16
    adapters on q, k, v and out projections, no dropout), "esm" (fair-esm's own forward, trained), "frozen" (no
    gradient: `torch.no_grad`, what a frozen ESM runs).
    """
    import torch

    from esm_gearnet.models.esm.architecture import build_esm2
    from esm_gearnet.models.esm.attention import esm2_forward_sdpa

    torch.manual_seed(0)
    model, alphabet = build_esm2(num_layers, width, heads)
    model = model.to(device)
    if mode == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        model = inject_adapter_in_model(LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                   target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]), model)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_("lora_" in name)
    tokens = torch.randint(4, 24, (batch, length), device=device)
    tokens[:, 0], tokens[:, -1] = alphabet.cls_idx, alphabet.eos_idx
    linears = [m for m in model.layers.modules() if isinstance(m, torch.nn.Linear)]

    def forward():
        if mode == "frozen":
            with torch.no_grad():
                return esm2_forward_sdpa(model, tokens, num_layers, alphabet.padding_idx, alphabet.mask_idx)
        if mode == "esm":
            return model(tokens, repr_layers=[num_layers])["representations"][num_layers]
        return esm2_forward_sdpa(model, tokens, num_layers, alphabet.padding_idx, alphabet.mask_idx,
                                 checkpoint=mode == "checkpoint")

    cast = linears if mode in ("full", "esm", "lora") else ()
    return run_pass(meter, device, forward, precision, list(model.parameters()), cast)


def fit(rows, columns):
    """Least-squares coefficients {column: c} of y = sum(c * x[column]) over rows of ({column: x}, y) (a column
    missing from a row is 0, the constant "1" is 1), and the worst residual relative to y."""
    import numpy as np

    a = np.array([[1.0 if c == "1" else float(x.get(c, 0.0)) for c in columns] for x, _ in rows])
    y = np.array([y for _, y in rows], dtype=float)
    coefficients, *_ = np.linalg.lstsq(a, y, rcond=None)
    worst = float(np.max(np.abs(a @ coefficients - y) / np.maximum(np.abs(y), 1.0)))
    return {c: round(float(v), 2) for c, v in zip(columns, coefficients)}, round(worst, 3)


def measure_esm(meter, device, widths, batch, length, precisions):
    """The ESM-2 tables, per token: what each layer keeps, what the model keeps outside its layers (embeddings, last
    layer norm, the output), one layer's backward working set (with activation checkpointing: its recomputed
    activations too), for each mode; a frozen model's forward working set."""
    tables = {"layer": {}, "outside": {}, "backward": {}, "frozen": {}}
    worst = {}
    for precision in precisions:
        for mode in ("full", "checkpoint", "lora", "esm", "frozen"):
            rows, outside, backward = [], [], []
            for width in widths:
                heads = width // 64  # ESM-2's head size up to 3B (15B: 128)
                for size in (length, 2 * length) if mode == "esm" else (length,):
                    tokens = batch * size
                    # the first run of a configuration pays one-time costs (imports, kernels' caches): not kept
                    _, one, three = (esm_run(meter, device, n, width, heads, batch, size, precision, mode)
                                     for n in (1, 1, 3))
                    if mode == "frozen":  # nothing is kept: the forward pass's working set, one layer at a time
                        rows.append(({"D": width}, one["forward_peak"] / tokens))
                        print(f"  esm {precision} frozen     D={width:5d}: working set {rows[-1][1]:9.0f} B/token",
                              flush=True)
                        continue
                    layer = (three["stored"] - one["stored"]) / 2 / tokens
                    rows.append(({"D": width, "HL": heads * size}, layer))
                    outside.append(({"D": width}, one["stored"] / tokens - layer))
                    backward.append(({"D": width}, one["backward"] / tokens))
                    print(f"  esm {precision} {mode:10s} D={width:5d} H={heads:3d} L={size:5d}: {layer:9.0f} "
                          f"B/token/layer ({layer / width:6.2f} x D), outside the layers {outside[-1][1]:8.0f}, "
                          f"backward working set {backward[-1][1]:8.0f} B/token", flush=True)
            columns = ("D", "HL", "1") if mode == "esm" else ("D", "1")
            if mode == "frozen":
                tables["frozen"][precision], worst[f"esm {precision} frozen"] = fit(rows, ("D", "1"))
                continue
            key = (precision, mode)
            tables["layer"][key], worst[f"esm {precision} {mode}"] = fit(rows, columns)
            tables["outside"][key], worst[f"esm {precision} {mode} outside"] = fit(outside, ("D", "1"))
            tables["backward"][key], worst[f"esm {precision} {mode} backward"] = fit(backward, ("D", "1"))
    return tables, worst


# ---- structure encoders -----------------------------------------------------------------------------------------
GRAPHS = {  # the graph construction of the shipped configs (config/EC/esm_gearnet.yaml, esm_gvp.yaml)
    "GearNet": {"class": "GraphConstruction", "node_layers": [{"class": "AlphaCarbonNode"}],
                "edge_layers": [{"class": "SequentialEdge", "max_distance": 2},
                                {"class": "SpatialEdge", "radius": 10.0, "min_distance": 5},
                                {"class": "KNNEdge", "k": 10, "min_distance": 5}]},
    "GVPGNN": {"class": "GraphConstruction", "node_layers": [{"class": "AlphaCarbonNode"}],
               "edge_layers": [{"class": "SpatialEdge", "radius": 10.0, "min_distance": 0}]},
}


def structure_run(meter, device, config, batch, length, precision):
    """One measurement of a structure encoder (a `class:` config, input_dim given) over `batch` proteins of `length`
    residues; its graph is constructed before (the graph is the batch's) and its input exists before (ESM's output,
    counted there)."""
    import torch

    import esm_gearnet.models  # noqa: F401  (registers the encoders)
    from esm_gearnet.data.protein import ProteinBatch
    from esm_gearnet.registry import build

    torch.manual_seed(0)
    graph_config = GRAPHS.get(config["class"])
    runtime = {"graph_construction_model": build(graph_config, "graph")} if graph_config else {}
    encoder = build(config, "structure_model", **runtime).to(device)
    graph = encoder.construct(ProteinBatch.pack(real_proteins(batch, length)).to(device))
    features = torch.randn(graph.num_residue, encoder.input_dim, device=device, requires_grad=True)
    linears = [m for m in encoder.modules() if isinstance(m, torch.nn.Linear)]

    def forward():
        return encoder.network(graph, features)["residue_feature"]

    result = run_pass(meter, device, forward, precision, list(encoder.parameters()), linears)
    result["edges_per_residue"] = len(graph.edge_list) / graph.num_residue if graph.edge_list is not None else 0.0
    result["residues"] = graph.num_residue
    return result


def structure_config(name, input_dim, width, layers, batch_norm=True):
    if name == "GearNet":  # config/EC/esm_gearnet.yaml's options
        return {"class": "GearNet", "input_dim": input_dim, "hidden_dims": [width] * layers, "num_relation": 7,
                "batch_norm": batch_norm, "concat_hidden": True, "short_cut": True, "readout": "sum"}
    if name == "GVPGNN":  # config/EC/esm_gvp.yaml's, width and layers varied
        return {"class": "GVPGNN", "node_in_dim": [input_dim, 0], "node_h_dim": [width, 16], "edge_in_dim": [16, 1],
                "edge_h_dim": [64, 1], "num_layers": layers, "vector_gate": True, "readout": "mean",
                "drop_rate": 0.1}
    # CDConv: config/EC/esm_cdconv.yaml's, every stage at `width`; a stage is a "layer" here
    return {"class": "CDConv", "input_dim": input_dim, "hidden_dims": [width] * layers, "embedding_dim": 16,
            "batch_norm": True, "cutoffs": [8.0, 12.0, 16.0, 20.0][:layers], "seq_cutoff": 21, "kernel_dims": [32],
            "base_width": 16.0, "dropout": 0.2}


ENCODERS = (("GearNet", True), ("GearNet", False), ("GVPGNN", True), ("CDConv", True))


def measure_structure(meter, device, widths, batch, length, precisions):
    """The structure encoders' tables: per layer, and the forward pass's working set above what is kept, each per
    residue. GearNet: columns RD_in (relations x input width), D_out, D_same (D_out where the short cut adds the
    input: input and output widths equal), F (1 for the first layer: the graph's adjacency); the others: D, F."""
    tables = {"layer": {}, "forward": {}, "backward": {}}
    worst, edges = {}, {}
    for precision in precisions:
        for name, batch_norm in ENCODERS:
            key = f"{name}{'' if batch_norm or name != 'GearNet' else '-no-bn'}"
            rows, forward, backward = [], [], []
            deepest = 2 if name == "CDConv" else 3
            for width in widths:
                for input_dim in (width, 1280):
                    try:
                        _, one, more = (structure_run(meter, device, structure_config(name, input_dim, width, n,
                                                                                      batch_norm), batch, length,
                                                      precision) for n in (1, 1, deepest))
                    except RuntimeError as error:  # GVP-GNN's index_add_ under bf16 autocast (found here)
                        print(f"  {key:14s} {precision}: fails ({str(error).splitlines()[0]}); not measured",
                              flush=True)
                        rows = []
                        break
                    residues = one["residues"]
                    edges[name] = round(one["edges_per_residue"], 1)
                    layer = (more["stored"] - one["stored"]) / (deepest - 1) / residues
                    first = one["stored"] / residues
                    if name == "GearNet":
                        if input_dim == width:
                            rows.append(({"RD_in": 7 * width, "D_out": width, "D_same": width}, layer))
                        rows.append(({"RD_in": 7 * input_dim, "D_out": width, "F": 1,
                                      "D_same": width if input_dim == width else 0}, first))
                        forward.append(({"RD_in": 7 * input_dim}, (one["forward_peak"] - one["stored"]) / residues))
                        backward.append(({"RD_in": 7 * input_dim}, one["backward"] / residues))
                    else:
                        if input_dim == width:
                            rows.append(({"D": width}, layer))
                        rows.append(({"D": width, "F": 1, "D_in": input_dim}, first))
                        forward.append(({"D_in": input_dim, "D": width},
                                        (one["forward_peak"] - one["stored"]) / residues))
                        backward.append(({"D_in": input_dim, "D": width}, one["backward"] / residues))
                    print(f"  {key:14s} {precision} D_in={input_dim:5d} D={width:4d}: {layer:8.0f} B/residue/layer, "
                          f"first layer {first:8.0f}, working sets: forward {forward[-1][1]:8.0f}, backward "
                          f"{backward[-1][1]:8.0f} B/residue ({edges[name]} edges/residue)", flush=True)
                else:
                    continue
                break
            if not rows:
                continue
            columns = ("RD_in", "D_out", "D_same", "1", "F") if name == "GearNet" else ("D", "1", "F", "D_in")
            tables["layer"][(precision, key)], worst[f"{key} {precision}"] = fit(rows, columns)
            forward_columns = ("RD_in", "1") if name == "GearNet" else ("D_in", "D", "1")
            tables["forward"][(precision, key)], worst[f"{key} {precision} forward"] = fit(forward, forward_columns)
            tables["backward"][(precision, key)], worst[f"{key} {precision} backward"] = fit(backward,
                                                                                             forward_columns)
    return tables, worst, edges


def measure(args):
    import torch

    torch.set_num_threads(1)
    device = torch.device(args.device)
    meter = meter_of(device)
    precisions = ("fp32", "bf16")
    esm_widths = (256, 512) if args.quick else (256, 512, 1024)
    structure_widths = (128, 256) if args.quick else (128, 256, 512)
    structure_length = min(args.length, 384)  # the 8 largest real structures hold 396 residues or more
    print(f"ESM-2 layers: {args.batch} x {args.length} tokens, widths {esm_widths}, head size 64", flush=True)
    esm, esm_worst = measure_esm(meter, device, esm_widths, args.batch, args.length, precisions)
    print(f"structure encoders: the {2 * args.batch} largest real structures cut to {structure_length} residues, "
          f"widths {structure_widths}", flush=True)
    structure, structure_worst, edges = measure_structure(meter, device, structure_widths, 2 * args.batch,
                                                          structure_length, precisions)
    command = "python benchmarks/plan_table.py" + (" --quick" if args.quick else "") + \
        (f" --device {args.device}" if args.device != "cpu" else "") + \
        (f" --batch {args.batch}" if args.batch != 2 else "") + \
        (f" --length {args.length}" if args.length != 512 else "")
    tables = {"ESM_LAYER": esm["layer"], "ESM_OUTSIDE": esm["outside"], "ESM_BACKWARD": esm["backward"],
              "ESM_FROZEN": esm["frozen"], "STRUCTURE_LAYER": structure["layer"],
              "STRUCTURE_FORWARD": structure["forward"], "STRUCTURE_BACKWARD": structure["backward"]}
    print("\n# ---- paste between PLAN TABLE START and END in esm_gearnet/commands/plan.py ----")
    print(f"# measured by `{command}` ({args.device}; ESM-2: {args.batch} x {args.length} tokens; structure encoders: "
          f"real\n# structures, edges per residue {edges})")
    for name, table in tables.items():
        print(f"{name} = {{")
        for key, value in table.items():
            print(f"    {key!r}: {value!r},")
        print("}")
    worst = {**esm_worst, **structure_worst}
    print("# worst residual of each fit, relative: " + ", ".join(f"{k} {v}" for k, v in worst.items()))
    print("RESULT " + json.dumps({"benchmark": "plan_table", "device": args.device, "batch": args.batch,
                                  "length": args.length, "edges_per_residue": edges, "worst_residual": worst,
                                  **{name: {" ".join(k) if isinstance(k, tuple) else k: v for k, v in table.items()}
                                     for name, table in tables.items()}}, sort_keys=True))


# ---- one real training step -------------------------------------------------------------------------------------
def step(args, rest):
    """One real training step of a config's task, measured, and plan's estimate of it for one CPU process."""
    import torch

    from esm_gearnet.assembly import build_optimizer, build_task, runtime_task_list
    from esm_gearnet.commands.arguments import base_parser, parse_args
    from esm_gearnet.commands.plan import estimate, load_plan_config
    from esm_gearnet.data import collate

    torch.set_num_threads(1)
    _, variables, overrides = parse_args(["-c", args.config, *rest], base_parser())
    cfg = load_plan_config(args.config, variables, overrides)
    device = torch.device(args.device)
    meter = meter_of(device)
    batch_size = int((cfg.get("engine") or {}).get("batch_size") or 1)
    batch = collate([{"graph": protein, "targets": torch.ones(1)}
                     for protein in proteins(batch_size, args.length, seed=1)])
    batch = {key: value.to(device) for key, value in batch.items()}

    def steps(count):
        """The peaks of `count` training steps of a fresh task above the memory before it existed."""
        torch.manual_seed(0)
        gc.collect()
        base = meter.current()
        task = build_task(cfg, runtime_task_list(cfg, ["target"])).to(device)
        task.train()
        optimizer = build_optimizer(cfg, task)
        peaks = []
        for _ in range(count):
            meter.reset()
            loss, _ = task(batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            peaks.append(meter.peak() - base)
        return peaks

    # a first task's step pays what happens once per process (imports, kernels' caches): not counted
    warm = steps(1)
    # the second step of the next: the optimizer's state exists, as in every step after the first
    peaks = steps(2)
    print(f"  (a first step in this process: {warm[0] / 2**20:.1f} MiB above the memory before its task)")
    plan = estimate(cfg, gpus=1, length=args.length, device="cpu")
    configured = next(row for row in plan["rows"] if row["strategy"] == "ddp" and not row["lora"])
    estimated = configured["bytes"]["peak"]
    print(f"{plan['model']}: batch {batch_size} x {args.length} residues")
    print(f"  measured peak of a training step: {peaks[-1] / 2**20:.1f} MiB (the first step: {peaks[0] / 2**20:.1f} "
          f"MiB); plan's estimate: {estimated / 2**20:.1f} MiB ({estimated / peaks[-1] - 1:+.1%})")
    print("RESULT " + json.dumps({"benchmark": "plan_step", "config": args.config, "overrides": rest,
                                  "length": args.length, "batch_size": batch_size, "measured_bytes": peaks[-1],
                                  "first_step_bytes": peaks[0], "estimated_bytes": estimated,
                                  "estimate": configured["bytes"]}, sort_keys=True))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="fewer widths (for a quick look, not the table)")
    parser.add_argument("--batch", type=int, default=2, help="proteins per measurement")
    parser.add_argument("--length", type=int, default=512, help="tokens (residues) per protein")
    parser.add_argument("--step", action="store_true", help="one real training step of -c CONFIG instead")
    parser.add_argument("-c", "--config", default=None)
    args, rest = parser.parse_known_args()
    if args.device == "cpu":
        _reexec_with_allocator_settings()
    if args.step:
        step(args, rest)
    else:
        measure(args)


if __name__ == "__main__":
    main()
