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
    esmc         + ESM C of the same layers, width and heads in place of ESM-2 (`model: ESM-C-*`): SwiGLU,
                 query/key layer norms; checked against ESM C's own fp32 sdpa path (it has no fair-esm forward;
                 its equality with transformers' EsmcModel is tests/test_esmc.py)
    stream       + the batches streamed from a FoldComp database (only when named in --levers): see below

Every lever is checked against the plain path (fair-esm attention, index_add_, fp32) on one batch of
CHECK_BATCH proteins (whatever --batch is, so the fp32 reference never decides how large a batch fits), same
weights: the relative difference of the loss (fp32 levers: below 1e-5; bf16: below 2e-2) and the largest
relative difference of a parameter gradient (reported). The ESM part's model FLOPs utilisation is printed
(benchmarks/esm_flops.py over the real tokens, forward + backward; frozen: the forward), over the measured
time, against the device's matrix-product peak in its own precision (bf16 on CUDA, fp32 on the CPU):
--peak-tflops, or measured here (benchmarks/peak.py) when 0.

`stream` feeds the `sparse` step from a FoldComp database of the same real structures (those FoldComp holds
faithfully, `benchmarks/_databases.py`, repeated to whole batches) through `engine.stream.loader` with one
DataLoader worker, as pre-training from AlphaFold DB does, the step at one thread (the worker has the other
core); its items are cropped to 550 with random multi-hot targets, and each epoch is a stream of its own (a
DataLoader whose worker starts, as in training). It adds the time the step waited for its batches (blocked in
`next`, the end of each epoch included) as a share of the timed epochs' time: all of it, and without each
epoch's first batch, whose wait (the worker's start) is given apart.

Models are built on the device (random initialisation there, never on the CPU and then moved). Each lever's
process writes its figures into a file the parent reads; its output goes where the parent's goes (the GPU
check's log, as it is printed). --max-batch LEVER then doubles the batch of that lever (a process each, without
the check, which ran at the first batch) until one runs out of GPU memory or reaches --batch-limit.

    python benchmarks/train_step.py [-c config/EC/esm_gearnet.yaml] [--esm 6,320,20] [--batch 8] [--repeats 2]
    python benchmarks/train_step.py --esm 33,1280,20 --levers baseline,bf16,unpadded   # ESM-2-650M on a GPU
"""
import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

from benchmarks._common import real_structure_files, report  # noqa: E402
from benchmarks.esm_flops import esm_flops  # noqa: E402
from benchmarks.peak import device_dtype, peak_tflops  # noqa: E402
from esm_gearnet.config import load_config  # noqa: E402
from esm_gearnet.data import collate, load_structures  # noqa: E402
from esm_gearnet.data.transforms import Compose, TruncateProtein  # noqa: E402
from esm_gearnet.engine import to_device  # noqa: E402
from esm_gearnet.engine.sampler import LengthBucketSampler  # noqa: E402
from esm_gearnet.engine.stream import loader  # noqa: E402
from esm_gearnet.assembly import build_task as assemble_task, model_config, optimizer_groups  # noqa: E402
from esm_gearnet.registry import resolve  # noqa: E402

NUM_TASK = 538  # EC
CHECK_BATCH = 4  # proteins of the batch every lever is checked on against the plain fp32 path
OUT_OF_MEMORY = 3  # exit status of a lever process that ran out of GPU memory
PLAIN = dict(attention="esm", bucket=False, aggregation="scatter", precision="fp32", ratio=0.1, compile=False,
             checkpointing=False, cache_gib=0.0, stream=False, threads=0, family="ESM-2")
OPT_IN = ("stream",)  # levers run only when --levers names them
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
    "esmc": "+ ESM C in place of ESM-2 (same layers, width, heads)",
    "stream": "+ batches streamed from a FoldComp database (1 worker, step at 1 thread)",
}


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
                         ("frozen", {"ratio": 0.0}), ("cache", {"ratio": 0.0, "cache_gib": 8.0}),
                         ("esmc", {"family": "ESM C"}),
                         ("stream", {"stream": True, "threads": 1})]:
        options[name] = {**current, **change}
    return options


def build_task(cfg, esm, options, device):
    cfg = copy.deepcopy(cfg)
    model, _ = model_config(cfg)
    layers, width, heads = esm
    if options["family"] == "ESM C":  # random weights: the name only chooses the family
        model.sequence_model["model"] = "ESM-C-300M"
    model.sequence_model.update({"pretrained": False, "architecture": [layers, width, heads],
                                 "attention": options["attention"], "compile": options["compile"],
                                 "activation_checkpointing": options["checkpointing"],
                                 "feature_cache_gib": options["cache_gib"]})
    # the structure model's input width follows the ESM width in series fusion: derived by the assembly
    model.structure_model.pop(resolve(model.structure_model["class"]).input_dim_key[0], None)
    model.structure_model["aggregation"] = options["aggregation"]  # GearNet's sparse product or index_add_
    cfg.sequence_model_lr_ratio = options["ratio"]
    torch.manual_seed(0)
    with torch.device(device):  # initialised on the device: a 650M ESM-2 takes ~20 s to initialise on 2 cores
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


class RandomTargets:
    """Random multi-hot EC targets for a streamed protein (a FoldComp database has no labels), drawn from torch's
    generator, which the stream seeds per sample."""

    def __call__(self, item):
        return {**item, "targets": (torch.rand(NUM_TASK) < 0.01).float()}


class Waited:
    """The batches of an iterator, recording the seconds the caller waited in each `next` (the last one, which
    ends the iteration and stops the DataLoader's worker, included) and the proteins' lengths of each batch ([B]
    residues)."""

    def __init__(self, batches):
        self.batches, self.waits, self.lengths = iter(batches), [], []

    def __iter__(self):
        return self

    def __next__(self):
        start = time.perf_counter()
        try:
            batch = next(self.batches)
        finally:
            self.waits.append(time.perf_counter() - start)
        self.lengths.append(batch["graph"].num_residues)
        return {k: v for k, v in batch.items() if k != "stream"}  # its place in the epoch: the trainer's business


def streamed_dataset(args, folder):
    """A FoldComp database of the real structures (--max-proteins files; those FoldComp holds faithfully, repeated
    to whole batches, at least two) written into `folder`, as the streamed training dataset (crop to 550, random
    targets)."""
    from benchmarks._databases import real_records, write_repeated
    from esm_gearnet.data.datasets.foldcomp import FoldCompDB

    records = real_records(files=real_structure_files()[:args.max_proteins])
    entries = max(-(-len(records) // args.batch), 2) * args.batch
    path = write_repeated(Path(folder) / "db", records, entries)
    print(f"stream: {len(records)} of the {args.max_proteins} structures held faithfully by FoldComp, "
          f"{entries} proteins an epoch", flush=True)
    return FoldCompDB(path, transform=Compose([TruncateProtein(max_length=550), RandomTargets()]))


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
    return float(loss.detach()), {n: p.grad.float() for n, p in task.named_parameters() if p.grad is not None}


def check(cfg, esm, options, batch, device):
    """Relative difference of the loss and the largest of the gradients, against the plain path (ESM C: its own
    sdpa path, it has no fair-esm forward)."""
    reference_options = dict(PLAIN, family=options["family"],
                             attention="sdpa" if options["family"] == "ESM C" else PLAIN["attention"])
    plain, _ = build_task(cfg, esm, reference_options, device)
    fast, _ = build_task(cfg, esm, options, device)
    fast.load_state_dict(plain.state_dict())
    reference, reference_grads = loss_and_gradients(plain, batch, reference_options)
    loss, grads = loss_and_gradients(fast, batch, options, passes=2 if options["cache_gib"] else 1)
    gradient = max(float((grads[n] - g).norm() / g.norm().clamp_min(1e-30))
                   for n, g in reference_grads.items() if n in grads)
    return abs(loss - reference) / abs(reference), gradient


def run_lever(args, name, cfg, esm, items, device):
    options = lever_options(device.type == "cuda")[name]
    if options["threads"]:
        torch.set_num_threads(options["threads"])
    task, optimizer = build_task(cfg, esm, options, device)
    if options["stream"]:  # each epoch: a stream of the database (a DataLoader, its worker started), as in training
        folder = tempfile.TemporaryDirectory()
        dataset, feeds = streamed_dataset(args, folder.name), []
        proteins = len(dataset)

        def epoch_data():
            feeds.append(Waited(loader(dataset, args.batch, 0, 1, seed=0, epoch=len(feeds), num_workers=1)))
            return feeds[-1]
    else:
        data, proteins = batches(items, args.batch, options["bucket"]), len(items)
        epoch_data = lambda: data  # noqa: E731
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    epoch(task, optimizer, epoch_data(), device, options)  # warm-up (and, for `cache`, the epoch that fills it)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        epoch(task, optimizer, epoch_data(), device, options)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    memory = (torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda"
              else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20)
    # [B] residues of each batch of one epoch
    lengths = feeds[-1].lengths if options["stream"] else [b["graph"].num_residues for b in data]
    residues = sum(int(n.sum()) for n in lengths)
    padded = (residues if options["attention"] == "varlen"  # packed: no padding token
              else sum(len(n) * int(n.max()) for n in lengths))
    figures = {"proteins_per_s": round(proteins / seconds, 2), "residues_per_s": round(residues / seconds),
               "padding": round(padded / residues, 3), "peak_memory_gib": round(memory, 2)}
    if not options["cache_gib"]:  # with the cache, ESM does not run in the timed epochs
        # each protein's tokens (<cls> + residues + <eos>): padding is not useful work, so the padded and
        # unpadded paths are credited the same FLOPs for the same data
        flops = esm_flops(esm, [n + 2 for b in lengths for n in b.tolist()], options["ratio"] > 0,
                          options["family"])
        figures["esm_mfu"] = round(flops / seconds / (args.peak_tflops * 1e12), 4)
    if options["stream"]:  # the timed epochs' waits: all of them, and those after each epoch's first batch
        waited, later = [w for f in feeds[1:] for w in f.waits], [w for f in feeds[1:] for w in f.waits[1:]]
        steps = sum(len(f.lengths) for f in feeds[1:])
        figures.update(threads=options["threads"], steps=steps, step_s=round(sum(times) / steps, 3),
                       data_wait_share=round(sum(waited) / sum(times), 5),
                       data_wait_share_after_first=round(sum(later) / sum(times), 5),
                       data_wait_ms_per_step=round(1e3 * sum(waited) / steps, 2),
                       first_batch_s=round(statistics.median(f.waits[0] for f in feeds[1:]), 3))
        del feeds
        folder.cleanup()
    del task, optimizer
    if args.no_check:
        return figures
    figures["loss_difference"], figures["gradient_difference"] = check(
        cfg, esm, options, to_device(batches(items, CHECK_BATCH, False)[0], device), device)
    tolerance = 2e-2 if options["precision"] == "bf16" else 1e-5
    figures["loss_check"] = "ok" if figures["loss_difference"] < tolerance else f"FAILED (> {tolerance})"
    return figures


def run_lever_process(args, lever, batch, check=True):
    """(exit status, figures or None) of one lever in a process of its own at `batch`; its output is printed
    where this process prints."""
    with tempfile.TemporaryDirectory() as folder:
        result = Path(folder) / "lever.json"
        command = [sys.executable, __file__, "-c", args.config, "--esm", args.esm, "--batch", str(batch),
                   "--repeats", str(args.repeats), "--max-proteins", str(args.max_proteins), "--device",
                   args.device, "--peak-tflops", repr(args.peak_tflops), "--lever", lever, "--result-file",
                   str(result)] + ([] if check else ["--no-check"])
        code = subprocess.run(command).returncode
        return code, (json.loads(result.read_text()) if result.exists() else None)


def largest_batch(args, figures_at_batch):
    """Double the batch of lever `args.max_batch` (one process each, no check) until one runs out of GPU memory
    or the batch passes --batch-limit; print and report the largest that ran and its throughput."""
    batch, best = args.batch, (args.batch, figures_at_batch)
    while batch * 2 <= args.batch_limit:
        batch *= 2
        code, figures = run_lever_process(args, args.max_batch, batch, check=False)
        if code == OUT_OF_MEMORY:
            print(f"{args.max_batch} at batch {batch}: out of GPU memory", flush=True)
            break
        if code != 0:
            raise SystemExit(f"lever {args.max_batch} at batch {batch} failed (exit {code}); its output is above.")
        best = (batch, figures)
        print(f"{args.max_batch} at batch {batch}: {figures}", flush=True)
    print(f"largest batch that ran for {args.max_batch}: {best[0]} (limit {args.batch_limit})")
    report("train_step_largest_batch", lever=args.max_batch, batch=best[0], batch_limit=args.batch_limit,
           figures=best[1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", default="config/EC/esm_gearnet.yaml")
    parser.add_argument("--esm", default="6,320,20", help="layers,width,heads of the random ESM-2 (and ESM C)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-proteins", type=int, default=48)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--peak-tflops", type=float, default=0.0,
                        help="the device's matrix-product peak in its own precision, for MFU (0: measured here)")
    parser.add_argument("--levers", default=None, help="comma-separated subset of the levers (default: all)")
    parser.add_argument("--max-batch", default=None, metavar="LEVER",
                        help="then double the batch for this lever until it no longer fits in GPU memory (or "
                             "passes --batch-limit), and report the largest that ran with its throughput (the "
                             "proteins repeat to fill two batches)")
    parser.add_argument("--batch-limit", type=int, default=4096)
    parser.add_argument("--lever", help=argparse.SUPPRESS)  # internal: run one lever in this process
    parser.add_argument("--result-file", help=argparse.SUPPRESS)  # internal: where that lever's figures go
    parser.add_argument("--no-check", action="store_true", help=argparse.SUPPRESS)  # internal: the search
    args = parser.parse_args()
    esm = tuple(int(x) for x in args.esm.split(","))
    device = torch.device(args.device)

    if args.lever is None:  # the parent: one process per lever
        known = list(lever_options(device.type == "cuda"))
        names = args.levers.split(",") if args.levers else [name for name in known if name not in OPT_IN]
        if args.max_batch and args.max_batch not in names:  # the search starts from its figures at --batch
            names.append(args.max_batch)
        unknown = sorted(set(names) - set(known))
        if unknown:
            parser.error(f"--levers/--max-batch: unknown {', '.join(unknown)}; choose from {', '.join(known)}.")
        if args.peak_tflops <= 0:
            args.peak_tflops = peak_tflops(device, device_dtype(device))
        print(f"ESM-2 {esm}; batch {args.batch}; {device}, {torch.get_num_threads()} threads; one process per "
              f"lever; peak {args.peak_tflops:.3g} TFLOP/s", flush=True)
        results = {}
        for name in names:
            code, figures = run_lever_process(args, name, args.batch)
            if code != 0:
                raise SystemExit(f"lever {name} failed (exit {code}); its output is above.")
            results[name] = figures
            print(f"{name:11s} {figures}", flush=True)
        base = results.get("baseline", next(iter(results.values())))["proteins_per_s"]
        print()
        for name, figures in results.items():
            print(f"{DESCRIPTIONS[name]:70s} {figures['proteins_per_s']:7.2f} proteins/s  "
                  f"{figures['proteins_per_s'] / base:5.2f}x  MFU {figures.get('esm_mfu', '-')}  "
                  f"loss check {figures['loss_check']}")
        report("train_step", device=str(device), esm=list(esm), batch=args.batch, peak_tflops=args.peak_tflops,
               **{n: dict(f, ratio=round(f["proteins_per_s"] / base, 2)) for n, f in results.items()})
        if args.max_batch:
            largest_batch(args, results.get(args.max_batch))
        return

    cfg = load_config(str(HERE.parent / args.config), {"branch": "MF", "ckpt": None})
    proteins, _ = load_structures(real_structure_files()[:args.max_proteins], workers=1, progress=False)
    while len(proteins) < max(2 * args.batch, CHECK_BATCH):  # large batches: the proteins repeat to fill two
        proteins = proteins + proteins
    crop = TruncateProtein(max_length=550)
    generator = torch.Generator().manual_seed(0)
    items = [{"graph": crop(p), "targets": (torch.rand(NUM_TASK, generator=generator) < 0.01).float()}
             for p in proteins]
    try:
        figures = run_lever(args, args.lever, cfg, esm, items, device)
    except torch.cuda.OutOfMemoryError:
        print(f"lever {args.lever} at batch {args.batch}: out of GPU memory")
        sys.exit(OUT_OF_MEMORY)
    Path(args.result_file).write_text(json.dumps(figures))


if __name__ == "__main__":
    main()
