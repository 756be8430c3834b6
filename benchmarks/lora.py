"""LoRA against full fine-tuning of the language model: trainable parameters and peak memory of training steps
(forward, backward, Adam) of an ESM-GearNet config with a random-weight ESM-2 (default: ESM-2-150M's architecture,
30 layers, width 640, 20 heads), the config's GearNet and head, on real structures cropped to 550 residues (as the
EC transform does) with random multi-hot targets.

Rows, each in a fresh process of its own, so that its peak is its own:

    full    the language model trains (config/EC/esm_gearnet.yaml: `sequence_model_lr_ratio: 0.1`)
    lora    `lora: {rank: --rank}` on the default targets (q_proj, k_proj, v_proj, out_proj): the base frozen

Each row takes two steps on the same batch. Adam's state is made in the first step's `optimizer.step`, after its
backward has freed the activations, so only the second step holds it through a forward and backward, as every
later step of a run does: the peak after the second step is the figure to compare, the first step's is given too.
Each row reports its trainable parameters (all, and the language model's), the bytes of parameters, gradients and
Adam state (counted on the tensors), its peak memory (CPU: the process's peak resident size, `ru_maxrss`; CUDA:
peak allocated) after the build and after each step, and the second step's time (one step: a rough figure).

    python benchmarks/lora.py [-c config/EC/esm_gearnet.yaml] [--esm 30,640,20] [--rank 8] [--batch 4]
                              [--activation-checkpointing]
"""
import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

from benchmarks._common import real_structure_files, report  # noqa: E402
from esm_gearnet.assembly import build_task, model_config, optimizer_groups  # noqa: E402
from esm_gearnet.config import load_config  # noqa: E402
from esm_gearnet.data import collate, load_structures  # noqa: E402
from esm_gearnet.data.transforms import TruncateProtein  # noqa: E402
from esm_gearnet.engine import to_device  # noqa: E402
from esm_gearnet.registry import resolve  # noqa: E402

NUM_TASK = 538  # EC
MIB = 2 ** 20
ROWS = ("full", "lora")


def peak_mib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def tensor_mib(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / MIB


def run_row(args, row: str) -> dict:
    """One training step of the row's model; its figures."""
    device = torch.device(args.device)
    cfg = load_config(str(HERE.parent / args.config), {"branch": "MF", "ckpt": None})
    model, _ = model_config(cfg)
    model.sequence_model.update({"pretrained": False, "architecture": [int(x) for x in args.esm.split(",")],
                                 "attention": "sdpa", "activation_checkpointing": args.activation_checkpointing})
    model.sequence_model.pop("path", None)
    model.sequence_model.pop("model", None)
    if row == "lora":
        model.sequence_model["lora"] = {"rank": args.rank}
    model.structure_model.pop(resolve(model.structure_model["class"]).input_dim_key[0], None)  # derived
    proteins, _ = load_structures(real_structure_files()[:args.batch], workers=1, progress=False)
    crop, generator = TruncateProtein(max_length=550), torch.Generator().manual_seed(0)
    batch = to_device(collate([{"graph": crop(p), "targets": (torch.rand(NUM_TASK, generator=generator) < 0.01)
                                .float()} for p in proteins]), device)
    torch.manual_seed(0)
    with torch.device(device):
        task = build_task(cfg, list(range(NUM_TASK))).train()
    optimizer = torch.optim.Adam(optimizer_groups(cfg, task, 1e-4), lr=1e-4)
    peaks = [peak_mib(device)]
    for _ in range(2):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=False)  # the gradients stay allocated between steps, as in a run
        loss, _ = task(batch)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        peaks.append(peak_mib(device))
    lm = task.encoder.sequence_model
    trainable = [p for p in task.parameters() if p.requires_grad]
    return {"trainable": sum(p.numel() for p in trainable),
            "trainable_lm": sum(p.numel() for p in lm.parameters() if p.requires_grad),
            "lm_parameters": sum(p.numel() for p in lm.parameters()),
            "parameters_mib": round(tensor_mib(task.parameters()), 1),
            "gradients_mib": round(tensor_mib(p.grad for p in task.parameters() if p.grad is not None), 1),
            "adam_mib": round(tensor_mib(t for s in optimizer.state.values() for t in s.values()
                                         if torch.is_tensor(t) and t.dim()), 1),
            "built_peak_mib": round(peaks[0], 1), "first_step_peak_mib": round(peaks[1], 1),
            "peak_mib": round(peaks[2], 1), "step_s": round(seconds, 2),
            "residues": int(batch["graph"].num_residues.sum())}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", default="config/EC/esm_gearnet.yaml")
    parser.add_argument("--esm", default="30,640,20", help="layers,width,heads of the random ESM-2 (150M's)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--activation-checkpointing", action="store_true", help="of the ESM layers, in both rows")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--row", choices=ROWS, help=argparse.SUPPRESS)  # one row, in this process
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        Path(args.out).write_text(json.dumps(run_row(args, args.row)))
        return
    results = {}
    for row in ROWS:  # a fresh process each: its peak is its own
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            subprocess.run([sys.executable, __file__, *sys.argv[1:], "--row", row, "--out", out.name], check=True)
            results[row] = json.loads(Path(out.name).read_text())
    full, lora = results["full"], results["lora"]
    checkpointing = ", activation checkpointing" if args.activation_checkpointing else ""
    print(f"ESM-2 {args.esm} (random weights) + the config's GearNet, {full['residues']} residues a batch, "
          f"{args.device}{checkpointing}")
    print("| row | trainable parameters (LM's of all LM's) | params + grads + Adam MiB | peak MiB: built, step 1, "
          "step 2 | step 2 s |")
    print("|---|---|---|---|---|")
    for row, f in results.items():
        state = f["parameters_mib"] + f["gradients_mib"] + f["adam_mib"]
        print(f"| {row} | {f['trainable']:,} ({f['trainable_lm']:,} of {f['lm_parameters']:,}) | {state:.0f} | "
              f"{f['built_peak_mib']:.0f}, {f['first_step_peak_mib']:.0f}, {f['peak_mib']:.0f} | {f['step_s']} |")
    print(f"LoRA trains {lora['trainable'] / full['trainable']:.3f}x the parameters and peaks at "
          f"{lora['peak_mib'] / full['peak_mib']:.2f}x the memory of full fine-tuning")
    report("lora", device=args.device, esm=args.esm, rank=args.rank, batch=args.batch,
           activation_checkpointing=args.activation_checkpointing, rows=results,
           trainable_ratio=round(lora["trainable"] / full["trainable"], 4),
           peak_ratio=round(lora["peak_mib"] / full["peak_mib"], 3))


if __name__ == "__main__":
    main()
