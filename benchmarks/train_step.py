"""Full training steps (forward, backward, Adam) of an ESM-GearNet config on real structures, lever by lever.

The config's model with a random-weight ESM-2 of the chosen size (the structure encoder's input width follows
it), the config's graph construction and task head, random multi-hot targets. One epoch over the real
structures of ../shared/data (cropped to 550 residues, as the EC transform does) at the chosen batch size;
median epoch time of the repeats after one warm-up epoch. Each lever runs in its own process, so its peak
memory is its own (CPU: peak resident size of the process; CUDA: peak allocated).

Levers, cumulative down to `sparse` (or `bf16` on CUDA), then each opt-in on top of that:

    baseline     fair-esm attention, random batches, fp32, index_add_ aggregation, ESM trained (lr ratio 0.1)
    sdpa         ESM through scaled_dot_product_attention
    bucket       length-bucketed batches (LengthBucketSampler, as `engine.bucket: true`)
    sparse       GearNet's relational aggregation as one sparse-dense product
    bf16         bf16 autocast (CUDA only)
    unpadded     + ESM on the packed batch, no padding tokens (`attention: varlen`; FlashAttention's
                 variable-length kernel under bf16 on CUDA, one SDPA per sequence on CPU and in fp32)
    unpadded_random  + unpadded, random batches instead of length buckets (buckets are then optional)
    compile      + torch.compile of the ESM layers (`compile: true`)
    checkpoint   + activation checkpointing of the ESM layers (`activation_checkpointing: true`)
    frozen       + ESM frozen, run without autograd (esm_gearnet_freeze.yaml: changes the science)
    cache        + frozen ESM's features cached per protein (`feature_cache_gib`); the timed epochs hit it

Every lever is checked against the plain path (fair-esm attention, index_add_, fp32) on the same batch, same
weights: the relative difference of the loss (fp32 levers: below 1e-5; bf16: below 2e-2) and the largest
relative difference of a parameter gradient (reported). On CUDA the ESM part's model FLOPs utilisation is
printed: 6 x non-embedding parameters + 12 x layers x width x length FLOPs per residue (forward + backward;
frozen: a third of it), over the measured time, against --peak-tflops.

    python benchmarks/train_step.py [-c config/EC/esm_gearnet.yaml] [--esm 6,320,20] [--batch 8] [--repeats 2]
    python benchmarks/train_step.py --esm 33,1280,20 --peak-tflops 989   # ESM-2-650M on an H200 (bf16 dense)
"""
import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

from benchmarks._common import real_structure_files, report  # noqa: E402
from esm_gearnet.config import load_config  # noqa: E402
from esm_gearnet.data import collate, load_structures  # noqa: E402
from esm_gearnet.data.transforms import TruncateProtein  # noqa: E402
from esm_gearnet.engine import to_device  # noqa: E402
from esm_gearnet.engine.sampler import LengthBucketSampler  # noqa: E402
from esm_gearnet.assembly import build_task as assemble_task, model_config, optimizer_groups  # noqa: E402
from esm_gearnet.registry import resolve  # noqa: E402

NUM_TASK = 538  # EC
PLAIN = dict(attention="esm", bucket=False, aggregation="scatter", precision="fp32", ratio=0.1, compile=False,
             checkpointing=False, cache_gib=0.0)
DESCRIPTIONS = {
    "baseline": "baseline: fair-esm attention, random batches, fp32, index_add_ aggregation, ESM trained",
    "sdpa": "+ SDPA attention", "bucket": "+ length-bucketed batches (`engine.bucket: true`)",
    "sparse": "+ sparse relational aggregation in GearNet", "bf16": "+ bf16 autocast",
    "unpadded": "+ unpadded ESM (`attention: varlen`)",
    "unpadded_random": "+ unpadded ESM, random batches (no buckets)",
    "compile": "+ torch.compile of the ESM layers (`compile: true`)",
    "checkpoint": "+ activation checkpointing of the ESM layers",
    "frozen": "+ ESM frozen, no autograd (a different experiment)",
    "cache": "+ ESM frozen, features cached per protein",
}


CHECK_BATCH = 4  # proteins of the batch each lever is checked on against the plain path


def lever_options(cuda):
    """name -> options; cumulative up to the best default path, then each opt-in on top of it."""
    steps = [("baseline", {}), ("sdpa", {"attention": "sdpa"}), ("bucket", {"bucket": True}),
             ("sparse", {"aggregation": "sparse"})] + ([("bf16", {"precision": "bf16"})] if cuda else [])
    options, current = {}, dict(PLAIN)
    for name, change in steps:
        current = {**current, **change}
        options[name] = current
    for name, change in [("unpadded", {"attention": "varlen"}),
                         ("unpadded_random", {"attention": "varlen", "bucket": False}),
                         ("compile", {"compile": True}), ("checkpoint", {"checkpointing": True}),
                         ("frozen", {"ratio": 0.0}), ("cache", {"ratio": 0.0, "cache_gib": 8.0})]:
        options[name] = {**current, **change}
    return options


def build_task(cfg, esm, options, device):
    cfg = copy.deepcopy(cfg)
    model, _ = model_config(cfg)
    layers, width, heads = esm
    model.sequence_model.update({"pretrained": False, "architecture": [layers, width, heads],
                                 "attention": options["attention"], "compile": options["compile"],
                                 "activation_checkpointing": options["checkpointing"],
                                 "feature_cache_gib": options["cache_gib"]})
    # the structure model's input width follows the ESM width in series fusion: derived by the assembly
    model.structure_model.pop(resolve(model.structure_model["class"]).input_dim_key[0], None)
    model.structure_model["aggregation"] = options["aggregation"]  # GearNet's sparse product or index_add_
    cfg.sequence_model_lr_ratio = options["ratio"]
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs, never on the CPU and moved
        task = assemble_task(cfg, list(range(NUM_TASK)))
    optimizer = torch.optim.Adam(optimizer_groups(cfg, task, 1e-4), lr=1e-4)
    return task.to(device).train(), optimizer


def batches(items, batch_size, bucket, seed=0):
    if bucket:
        sampler = LengthBucketSampler([it["graph"].num_residue for it in items], batch_size, seed=seed)
        sampler.set_epoch(0)
        groups = list(sampler)
    else:
        order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
        groups = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return [collate([items[i] for i in group]) for group in groups]


def autocast(precision):
    return torch.autocast("cuda", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def epoch(task, optimizer, data, device, options):
    for batch in data:
        batch = to_device(batch, device)
        with autocast(options["precision"]):
            loss, _ = task(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()


def loss_and_gradients(task, batch, options, passes=1):
    """Loss and parameter gradients on one batch in eval mode (the last of `passes` forwards: the cache's hit)."""
    task.eval()
    for _ in range(passes):
        task.zero_grad(set_to_none=True)
        with autocast(options["precision"]):
            loss, _ = task(batch)
        loss.backward()
    return float(loss), {n: p.grad.float() for n, p in task.named_parameters() if p.grad is not None}


def check(cfg, esm, options, batch, device):
    """Relative difference of the loss and the largest of the gradients, against the plain path."""
    plain, _ = build_task(cfg, esm, PLAIN, device)
    fast, _ = build_task(cfg, esm, options, device)
    fast.load_state_dict(plain.state_dict())
    reference, reference_grads = loss_and_gradients(plain, batch, PLAIN)
    loss, grads = loss_and_gradients(fast, batch, options, passes=2 if options["cache_gib"] else 1)
    gradient = max(float((grads[n] - g).norm() / g.norm().clamp_min(1e-30))
                   for n, g in reference_grads.items() if n in grads)
    return abs(loss - reference) / abs(reference), gradient


def esm_flops_per_residue(esm, length, trained=True):
    layers, width, _ = esm
    non_embedding = layers * 12 * width * width  # attention 4 d^2 + feed-forward 8 d^2 per layer
    forward = 2 * non_embedding + 4 * layers * width * length
    return 3 * forward if trained else forward


def run_lever(args, name, cfg, esm, items, device):
    options = lever_options(device.type == "cuda")[name]
    residues = sum(it["graph"].num_residue for it in items)
    task, optimizer = build_task(cfg, esm, options, device)
    data = batches(items, args.batch, options["bucket"])
    padded = (residues if options["attention"] == "varlen"  # packed: no padding token
              else sum(b["graph"].batch_size * int(b["graph"].num_residues.max()) for b in data))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    epoch(task, optimizer, data, device, options)  # warm-up (and, for `cache`, the epoch that fills it)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        epoch(task, optimizer, data, device, options)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    memory = (torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda"
              else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20)
    figures = {"proteins_per_s": round(len(items) / seconds, 2), "residues_per_s": round(residues / seconds),
               "padding": round(padded / residues, 3), "peak_memory_gib": round(memory, 2)}
    if device.type == "cuda" and not options["cache_gib"]:  # with the cache, ESM does not run in timed epochs
        # model FLOPs: each residue attends over its own protein only (padding is not useful work), so the
        # padded and unpadded paths are credited the same FLOPs for the same data
        flops = sum(esm_flops_per_residue(esm, n, options["ratio"] > 0) * n
                    for b in data for n in b["graph"].num_residues.tolist())
        figures["esm_mfu"] = round(flops / seconds / (args.peak_tflops * 1e12), 3)
    del task, optimizer
    # the references run at a small fixed batch: their memory is not what the lever's batch size measures
    figures["loss_difference"], figures["gradient_difference"] = check(
        cfg, esm, options, to_device(batches(items, min(args.batch, CHECK_BATCH), False)[0], device), device)
    tolerance = 2e-2 if options["precision"] == "bf16" else 1e-5
    figures["loss_check"] = "ok" if figures["loss_difference"] < tolerance else f"FAILED (> {tolerance})"
    return figures


def largest_batch(args, figures_at_batch):
    """Double the batch of lever `args.max_batch` (one process each) until one runs out of GPU memory; print and
    report the largest that fits and its throughput."""
    batch, best = args.batch, (args.batch, figures_at_batch)
    argv = [a for a in sys.argv[1:] if a not in ("--max-batch", args.max_batch)]
    while batch < 4096:
        batch *= 2
        child = subprocess.run([sys.executable, __file__, *argv, "--batch", str(batch), "--lever", args.max_batch],
                               capture_output=True, text=True)
        if child.returncode != 0:
            if "out of memory" not in child.stderr.lower():
                raise SystemExit(f"lever {args.max_batch} at batch {batch} failed:\n{child.stderr[-4000:]}")
            break
        best = (batch, json.loads(child.stdout.split("LEVER ", 1)[1]))
        print(f"{args.max_batch} at batch {batch}: {best[1]}", flush=True)
    print(f"largest batch that fits for {args.max_batch}: {best[0]}")
    report("train_step_largest_batch", lever=args.max_batch, batch=best[0], figures=best[1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", default="config/EC/esm_gearnet.yaml")
    parser.add_argument("--esm", default="6,320,20", help="layers,width,heads of the random ESM-2")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-proteins", type=int, default=48)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="device bf16 dense peak, for MFU")
    parser.add_argument("--levers", default=None, help="comma-separated subset of the levers (default: all)")
    parser.add_argument("--max-batch", default=None, metavar="LEVER",
                        help="then double the batch for this lever until it no longer fits in GPU memory, and report "
                             "the largest that fits with its throughput (the proteins repeat to fill two batches)")
    parser.add_argument("--lever", help=argparse.SUPPRESS)  # internal: run one lever in this process
    args = parser.parse_args()
    esm = tuple(int(x) for x in args.esm.split(","))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    if args.max_batch and device.type != "cuda":
        parser.error("--max-batch searches the GPU's memory; it needs a CUDA device.")
    if args.lever is None:  # the parent: one process per lever
        known = list(lever_options(device.type == "cuda"))
        names = args.levers.split(",") if args.levers else known
        if set(names) - set(known):
            parser.error(f"--levers: unknown {', '.join(sorted(set(names) - set(known)))}; choose from "
                         f"{', '.join(known)}.")
        print(f"ESM-2 {esm}; batch {args.batch}; {device}, {torch.get_num_threads()} threads; one process per lever")
        results = {}
        for name in names:
            command = [sys.executable, __file__, *sys.argv[1:], "--lever", name]
            child = subprocess.run(command, capture_output=True, text=True)
            if child.returncode != 0:
                raise SystemExit(f"lever {name} failed:\n{child.stderr[-4000:]}")
            results[name] = json.loads(child.stdout.split("LEVER ", 1)[1])
            print(f"{name:11s} {results[name]}", flush=True)
        base = results.get("baseline", next(iter(results.values())))["proteins_per_s"]
        print()
        for name, figures in results.items():
            print(f"{DESCRIPTIONS[name]:70s} {figures['proteins_per_s']:7.2f} proteins/s  "
                  f"{figures['proteins_per_s'] / base:5.2f}x  loss check {figures['loss_check']}")
        report("train_step", device=str(device), esm=list(esm), batch=args.batch,
               **{n: dict(f, ratio=round(f["proteins_per_s"] / base, 2)) for n, f in results.items()})
        if args.max_batch:
            largest_batch(args, results.get(args.max_batch))
        return

    cfg = load_config(str(HERE.parent / args.config), {"branch": "MF", "ckpt": None})
    proteins, _ = load_structures(real_structure_files()[:args.max_proteins], workers=1, progress=False)
    while len(proteins) < 2 * args.batch:  # large batches (--max-batch): the proteins repeat to fill two
        proteins = proteins + proteins
    crop = TruncateProtein(max_length=550)
    generator = torch.Generator().manual_seed(0)
    items = [{"graph": crop(p), "targets": (torch.rand(NUM_TASK, generator=generator) < 0.01).float()}
             for p in proteins]
    print("LEVER " + json.dumps(run_lever(args, args.lever, cfg, esm, items, device)))


if __name__ == "__main__":
    main()
