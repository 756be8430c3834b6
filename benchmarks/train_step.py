"""Full training steps (forward, backward, Adam) of an ESM-GearNet config on real structures, lever by lever.

The config's model with a random-weight ESM-2 of the chosen size (the structure encoder's input width follows
it), the config's graph construction and task head, random multi-hot targets. One epoch over the real
structures of ../shared/data (cropped to 550 residues, as the EC transform does), batch 8; median epoch time of
the repeats after one warm-up epoch. Levers:

    baseline   fair-esm attention, random batches, fp32, ESM trained (lr ratio 0.1)
    sdpa       ESM through scaled_dot_product_attention
    bucket     + length-bucketed batches (less padding)
    bf16       + bf16 autocast (CUDA only)
    frozen     + ESM frozen (esm_gearnet_freeze.yaml: no ESM gradients; changes the science)

Before timing, the SDPA path's loss is checked against fair-esm's on the same batch (fp32, relative 1e-5;
the random head's loss is about 10^3, so that is the meaningful scale).
On CUDA the ESM part's model FLOPs utilisation is printed: 6 × non-embedding parameters + 12 × layers ×
width × length FLOPs per residue (forward + backward), over the measured time, against --peak-tflops.

    python benchmarks/train_step.py [-c config/EC/esm_gearnet.yaml] [--esm 6,320,20] [--batch 8] [--repeats 2]
    python benchmarks/train_step.py --esm 33,1280,20 --peak-tflops 989   # ESM-2-650M on an H200 (bf16 dense)
"""
import argparse
import copy
import resource
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

# benchmarks/esm.py would shadow fair-esm: keep this folder off sys.path
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

from benchmarks._common import real_structure_files, report  # noqa: E402
from esm_gearnet.config import load_config  # noqa: E402
from esm_gearnet.data import collate, load_structures  # noqa: E402
from esm_gearnet.data.transforms import TruncateProtein  # noqa: E402
from esm_gearnet.inference import length_batches  # noqa: E402
from esm_gearnet.registry import build  # noqa: E402
from esm_gearnet.training import parameter_groups  # noqa: E402


def build_task(cfg, esm, attention, ratio, num_task, device):
    cfg = copy.deepcopy(cfg)
    model = cfg.task.model
    layers, width, heads = esm
    model.sequence_model.update({"pretrained": False, "architecture": [layers, width, heads], "attention": attention})
    if model.get("fusion") in (None, "series", "serial"):
        key = "node_in_dim" if model.structure_model["class"] == "GVPGNN" else "input_dim"
        model.structure_model[key] = [width, 0] if key == "node_in_dim" else width
    cfg.sequence_model_lr_ratio = ratio
    torch.manual_seed(0)
    task = build(cfg.task, "task", task=list(range(num_task)))
    optimizer = torch.optim.Adam(parameter_groups(cfg, task, 1e-4), lr=1e-4)
    return task.to(device).train(), optimizer


def batches(items, batch_size, bucket, seed=0):
    if bucket:
        groups = list(length_batches([it["graph"].num_residue for it in items], max_residues=10 ** 9,
                                     max_proteins=batch_size))
    else:
        order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
        groups = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return [collate([items[i] for i in group]) for group in groups]


def to_device(batch, device):
    return {k: (v.to(device, non_blocking=True) if hasattr(v, "to") else v) for k, v in batch.items()}


def epoch(task, optimizer, data, device, precision):
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    for batch in data:
        batch = to_device(batch, device)
        with autocast:
            loss, _ = task(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()


def esm_flops_per_residue(esm, length):
    layers, width, _ = esm
    non_embedding = layers * 12 * width * width  # attention 4 d^2 + feed-forward 8 d^2 per layer
    return 6 * non_embedding + 12 * layers * width * length


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", default="config/EC/esm_gearnet.yaml")
    parser.add_argument("--esm", default="6,320,20", help="layers,width,heads of the random ESM-2")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-proteins", type=int, default=48)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="device bf16 dense peak, for MFU")
    args = parser.parse_args()
    esm = tuple(int(x) for x in args.esm.split(","))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = load_config(str(Path(__file__).resolve().parents[1] / args.config), {"branch": "MF", "ckpt": None})
    proteins, _ = load_structures(real_structure_files()[:args.max_proteins], workers=2, progress=False)
    crop = TruncateProtein(max_length=550)
    items = [{"graph": crop(p), "targets": (torch.rand(538) < 0.01).float()} for p in proteins]
    residues = sum(it["graph"].num_residue for it in items)
    print(f"{len(items)} real proteins, {residues} residues after cropping to 550; ESM-2 {esm}; batch {args.batch}; "
          f"{device}, {torch.get_num_threads()} threads")

    # the fast path computes the same loss as fair-esm's attention (fp32, same weights, same batch)
    check = to_device(batches(items, args.batch, False)[0], device)
    plain, _ = build_task(cfg, esm, "esm", 0.1, 538, device)
    fast, _ = build_task(cfg, esm, "sdpa", 0.1, 538, device)
    fast.load_state_dict(plain.state_dict())
    plain.eval(), fast.eval()
    with torch.no_grad():
        reference = float(plain(check)[0])
        difference = abs(reference - float(fast(check)[0])) / abs(reference)
    print(f"loss, SDPA vs fair-esm attention on one batch (fp32): relative difference {difference:.2e}")
    assert difference < 1e-5

    levers = [("baseline", "esm", False, "fp32", 0.1), ("sdpa", "sdpa", False, "fp32", 0.1),
              ("sdpa+bucket", "sdpa", True, "fp32", 0.1)]
    if device.type == "cuda":
        levers.append(("sdpa+bucket+bf16", "sdpa", True, "bf16", 0.1))
    levers.append(("sdpa+bucket+frozen", "sdpa", True, levers[-1][3], 0.0))
    results = {}
    for name, attention, bucket, precision, ratio in levers:
        task, optimizer = build_task(cfg, esm, attention, ratio, 538, device)
        data = batches(items, args.batch, bucket)
        padded = sum(b["graph"].batch_size * int(b["graph"].num_residues.max()) for b in data)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        epoch(task, optimizer, data, device, precision)  # warm-up
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            epoch(task, optimizer, data, device, precision)
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        memory = (torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda"
                  else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20)
        figures = {"proteins_per_s": round(len(items) / seconds, 2), "residues_per_s": round(residues / seconds),
                   "padding": round(padded / residues, 3), "peak_memory_gib": round(memory, 2)}
        if device.type == "cuda":
            flops = sum(esm_flops_per_residue(esm, int(b["graph"].num_residues.max())) * b["graph"].num_residue
                        for b in data)
            figures["esm_mfu"] = round(flops / seconds / (args.peak_tflops * 1e12), 3)
        results[name] = figures
        print(f"{name:22s} {figures}")
        del task, optimizer
    base = results["baseline"]["proteins_per_s"]
    for name, figures in results.items():
        print(f"{name:22s} {figures['proteins_per_s'] / base:.2f}x the baseline")
    report("train_step", device=str(device), esm=list(esm), batch=args.batch, loss_difference=difference,
           **{name: dict(figures, ratio=round(figures["proteins_per_s"] / base, 2)) for name, figures in results.items()})


if __name__ == "__main__":
    main()
