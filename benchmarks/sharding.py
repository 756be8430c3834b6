"""Memory per rank under `engine.strategy: ddp` and `fsdp`, and (on a GPU) FSDP2 and LoRA at ESM-2 3B.

Part `memory` (CPU, gloo): ESM-2 of --esm (default 150M: 30 layers x 640) in serial fusion with GearNet (the EC
config's 6 x 512), random weights, Adam. For each world size W of --ranks a launch of W processes per strategy
trains --steps steps on short real proteins; every rank then counts the bytes it holds of parameters, gradients
and optimizer state (the local shards of sharded tensors) and reads its peak resident memory. Printed side by
side with the ratio to ddp: fsdp's ideal is 1/W. One process is the baseline (W = 1 is ddp and fsdp alike).

Part `gpu` (CUDA): (1) `fsdp` on one GPU (a process group of one: FSDP2's gathering and bf16 mixed precision run)
against the plain run, fp32 and bf16, the largest difference of the losses over --steps steps; (2) ESM-2 3B
(36 x 2560) in serial fusion with GearNet, one training step of --batch proteins of --length residues, with
LoRA (rank 16 on q, k, v, out) and with full fine-tuning under fsdp + activation checkpointing: peak GPU memory
and tokens/s.

    python benchmarks/sharding.py --part memory [--ranks 2,4] [--esm 30,640,20]
    python benchmarks/sharding.py --part gpu [--device cuda]
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks._common import report  # noqa: E402

STRUCTURES = Path(os.environ.get("ESM_GEARNET_SHARED_DATA", ROOT.parent / "shared" / "data")) / "structures"
PROTEINS = ["1ORC-A.pdb", "1D66-A.pdb", "2N2U-A.pdb", "6MRR-A.pdb"]  # 64-110 residues: the model dominates


def config(esm, lora=None, checkpointing=False, gearnet=None):
    """The EC serial-fusion config with ESM-2 of `esm` (layers, width, heads), random weights (and GearNet's
    hidden_dims when given: the CPU rehearsal's)."""
    from esm_gearnet.config import load_config

    cfg = load_config(str(ROOT / "config" / "EC" / "esm_gearnet.yaml"), {})
    sequence = cfg.task.model.sequence_model
    sequence.update({"pretrained": False, "architecture": list(esm), "activation_checkpointing": checkpointing})
    if lora:
        sequence["lora"] = lora
    cfg.task.model.structure_model.pop("input_dim", None)
    if gearnet:
        cfg.task.model.structure_model.hidden_dims = list(gearnet)
    return cfg


def task_of(cfg, device):
    from esm_gearnet.assembly import build_task

    torch.manual_seed(0)
    return build_task(cfg, list(range(4))).to(device)


def batch_of(names, device, length=None):
    """Real proteins (each cut to `length` residues when given) as a training batch with 4 random EC targets."""
    from esm_gearnet.data import collate
    from esm_gearnet.data.io import load_structure
    from esm_gearnet.data.transforms import ProteinView, TruncateProtein

    items = []
    for i, name in enumerate(names):
        protein = ProteinView(view="residue")({"graph": load_structure(STRUCTURES / name)})
        if length:
            protein = TruncateProtein(max_length=length)(protein)
        items.append({**protein, "targets": torch.tensor([i % 2, 1, 0, (i + 1) % 2], dtype=torch.float)})
    from esm_gearnet.engine.evaluation import to_device

    return to_device(collate(items), device)


def local_bytes(tensor):
    tensor = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return tensor.numel() * tensor.element_size()


def held(task, optimizer):
    """Bytes this rank holds of parameters, gradients and optimizer state."""
    parameters = sum(local_bytes(p) for p in task.parameters())
    gradients = sum(local_bytes(p.grad) for p in task.parameters() if p.grad is not None)
    state = sum(local_bytes(v) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    return {"parameters": parameters, "gradients": gradients, "optimizer": state}


def memory_worker(args):
    """One rank of a `memory` launch: --steps steps, then its bytes and peak RSS to rank 0's JSON file."""
    from esm_gearnet import distributed
    from esm_gearnet.assembly import build_optimizer
    from esm_gearnet.engine import Engine

    torch.set_num_threads(1)
    device = distributed.init()
    cfg = config(args.esm)
    task = task_of(cfg, device)
    engine = Engine(task, [], None, None, build_optimizer(cfg, task), progress=False, strategy=args.strategy)
    names = PROTEINS[distributed.rank() % len(PROTEINS):][:2] or PROTEINS[:2]
    batch = batch_of(names, device)
    for _ in range(args.steps):
        loss, _ = engine.model(batch)
        engine.stepper.backward(loss)
        held_now = held(engine.task, engine.stepper.optimizer)  # gradients exist until the step
        engine.stepper.step(engine.task.parameters())
    figures = {**held_now, "optimizer": held(engine.task, engine.stepper.optimizer)["optimizer"],
               "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    every = distributed.gather_objects(figures)
    if distributed.rank() == 0:
        Path(args.out).write_text(json.dumps(every))
    engine.close()
    distributed.shutdown()


def memory(args):
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for ranks in [1, *args.ranks]:
            for strategy in (["ddp"] if ranks == 1 else ["ddp", "fsdp"]):
                out = Path(folder) / f"{strategy}{ranks}.json"
                command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                           __file__, "--part", "memory-worker", "--strategy", strategy, "--out", str(out),
                           "--esm", ",".join(map(str, args.esm)), "--steps", str(args.steps)]
                env = dict(os.environ, OMP_NUM_THREADS="1")
                subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                per_rank = json.loads(out.read_text())
                held_bytes = max(r["parameters"] + r["gradients"] + r["optimizer"] for r in per_rank)
                rows.append({"ranks": ranks, "strategy": strategy, "held_mb": held_bytes / 2 ** 20,
                             "parameters_mb": max(r["parameters"] for r in per_rank) / 2 ** 20,
                             "gradients_mb": max(r["gradients"] for r in per_rank) / 2 ** 20,
                             "optimizer_mb": max(r["optimizer"] for r in per_rank) / 2 ** 20,
                             "peak_rss_mb": max(r["peak_rss"] for r in per_rank) / 2 ** 20})
    whole = rows[0]["held_mb"]
    print(f"ESM-2 {'x'.join(map(str, args.esm))} + GearNet (EC), Adam; MB per rank (the largest rank)")
    print(f"{'ranks':>5} {'strategy':>8} {'params':>9} {'grads':>9} {'optim':>9} {'held':>9} {'held/ddp':>9} "
          f"{'peak RSS':>9}")
    for row in rows:
        row["held_vs_one_process"] = row["held_mb"] / whole
        print(f"{row['ranks']:>5} {row['strategy']:>8} {row['parameters_mb']:>9.1f} {row['gradients_mb']:>9.1f} "
              f"{row['optimizer_mb']:>9.1f} {row['held_mb']:>9.1f} {row['held_vs_one_process']:>9.3f} "
              f"{row['peak_rss_mb']:>9.1f}")
    report("sharding_memory", esm=list(args.esm), rows=rows)


def gpu(args):
    """fsdp on one GPU against the plain run; ESM-2 3B with LoRA and with fsdp + activation checkpointing."""
    import torch.distributed as dist

    from esm_gearnet import sharding
    from esm_gearnet.assembly import build_optimizer
    from esm_gearnet.engine.stepper import Stepper

    device = torch.device(args.device)
    import socket

    with socket.socket() as free:  # a group of one process, on a free port
        free.bind(("127.0.0.1", 0))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free.getsockname()[1]))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    small = [int(x) for x in args.small_esm.split(",")]
    for precision in ("fp32", "bf16"):
        losses = {}
        for sharded in (False, True):
            cfg = config(small, gearnet=args.gearnet)
            task = task_of(cfg, device)
            optimizer = build_optimizer(cfg, task)
            if sharded:
                names = sharding.parameter_names(task)
                sharding.shard(task, device, precision)
                sharding.rebind(optimizer, names, task)
            stepper = Stepper(optimizer, None, device, precision)
            batch = batch_of(PROTEINS, device)
            losses[sharded] = []
            for _ in range(args.steps):
                with stepper.autocast():
                    loss, _ = task(batch)
                stepper.backward(loss)
                stepper.step(task.parameters())
                losses[sharded].append(float(loss.detach()))
        difference = max(abs(a - b) for a, b in zip(losses[False], losses[True]))
        print(f"fsdp on one {device.type} vs the plain run, {precision}: largest loss difference {difference:.2e}")
        report("sharding_one_gpu", precision=precision, steps=args.steps, max_loss_difference=difference,
               device=device.type)
    big = [int(x) for x in args.big_esm.split(",")]
    for name, lora, checkpointing, sharded in (("lora", {"rank": 16, "alpha": 32}, False, False),
                                                 ("full_fsdp_ac", None, True, True)):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        cfg = config(big, lora=lora, checkpointing=checkpointing, gearnet=args.gearnet)
        task = task_of(cfg, device)
        optimizer = build_optimizer(cfg, task)
        if sharded:
            names = sharding.parameter_names(task)
            sharding.shard(task, device, "bf16")
            sharding.rebind(optimizer, names, task)
        stepper = Stepper(optimizer, None, device, "bf16")
        batch = batch_of(PROTEINS * (args.batch // len(PROTEINS) or 1), device, args.length)
        tokens = int(batch["graph"].num_residues.sum())
        times = []
        for _ in range(2):  # the first step warms up
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            with stepper.autocast():
                loss, _ = task(batch)
            stepper.backward(loss)
            stepper.step(task.parameters())
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        trainable = sum(p.numel() for p in task.parameters() if p.requires_grad)
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
        print(f"ESM-2 {args.big_esm} {name}: trainable {trainable / 1e6:.1f} M, peak "
              f"{'-' if peak is None else f'{peak:.1f}'} GiB, {tokens / times[-1]:.0f} tokens/s")
        report("sharding_3b_step", variant=name, esm=big, trainable=trainable, peak_gib=peak,
               tokens_per_s=tokens / times[-1], step_s=times[-1], device=device.type)
        del task, optimizer, stepper
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["memory", "gpu", "memory-worker"], default="memory")
    parser.add_argument("--ranks", type=lambda s: [int(x) for x in s.split(",")], default=[2, 4])
    parser.add_argument("--esm", type=lambda s: [int(x) for x in s.split(",")], default=[30, 640, 20])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--strategy", default="ddp")
    parser.add_argument("--out", default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small-esm", default="6,320,20", help="part gpu: the model of the one-GPU equality")
    parser.add_argument("--big-esm", default="36,2560,40", help="part gpu: ESM-2 3B")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--gearnet", type=lambda s: [int(x) for x in s.split(",")], default=None,
                        help="part gpu: GearNet's hidden_dims (default: the EC config's 6 x 512)")
    args = parser.parse_args()
    {"memory": memory, "gpu": gpu, "memory-worker": memory_worker}[args.part](args)


if __name__ == "__main__":
    main()
