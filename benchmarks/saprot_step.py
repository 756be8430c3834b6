"""A SaProt-format language model against the ESM-2 one of the same size: full training steps of the serial
fusion (SaProt-GearNet vs ESM-GearNet) on the real structures, side by side in one process.

Rows, each a random-weight language model of `--esm` layers,width,heads on the default fast path
(`benchmarks/train_step.py`'s `sparse` lever on CPU, `bf16` on CUDA), the config's GearNet and head:

    esm2            config/EC/esm_gearnet.yaml: ESM-2's vocabulary (33 tokens)
    saprot_kept     config/EC/saprot_gearnet.yaml: SaProt's 446 amino-acid x 3Di tokens, the 3Di states kept by
                    the dataset (`three_di: true`: computed once in preprocessing, not in the step)
    saprot_fly      the same model, the states computed from the atoms in every step (a dataset without
                    `three_di`, e.g. `embed` on a user's files)

The rows' epochs alternate (one of each per round, after one warm-up epoch each) so that all see the same
machine load; each row's figure is its median epoch over `--repeats` rounds, and the ratios are to `esm2`.
Also the 3Di cost per protein (median over the same structures, what `three_di: true` adds to preprocessing).

    python benchmarks/saprot_step.py [--esm 6,320,20] [--batch 8] [--repeats 5]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

from benchmarks._common import alternating_times, real_structure_files, report  # noqa: E402
from benchmarks.train_step import NUM_TASK, batches, build_task, epoch, lever_options  # noqa: E402
from esm_gearnet.config import load_config  # noqa: E402
from esm_gearnet.data import load_structures, three_di_states  # noqa: E402
from esm_gearnet.data.transforms import TruncateProtein  # noqa: E402

CONFIGS = {"esm2": "config/EC/esm_gearnet.yaml", "saprot_kept": "config/EC/saprot_gearnet.yaml",
           "saprot_fly": "config/EC/saprot_gearnet.yaml"}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--esm", default="6,320,20", help="layers,width,heads of both random language models")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-proteins", type=int, default=48)
    args = parser.parse_args()
    esm = tuple(int(x) for x in args.esm.split(","))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    options = lever_options(device.type == "cuda")["bf16" if device.type == "cuda" else "sparse"]

    proteins, _ = load_structures(real_structure_files()[:args.max_proteins], workers=1, progress=False)
    crop = TruncateProtein(max_length=550)
    proteins = [crop(p) for p in proteins]
    three_di_states(proteins[0])  # mini3di's weights loaded
    kept, three_di_ms = [], []
    for protein in proteins:  # the states a `three_di: true` dataset keeps, timed once each
        start = time.perf_counter()
        kept.append(protein.replace(three_di_state=three_di_states(protein)))
        three_di_ms.append((time.perf_counter() - start) * 1e3)
    generator = torch.Generator().manual_seed(0)
    targets = [(torch.rand(NUM_TASK, generator=generator) < 0.01).float() for _ in proteins]
    items = {name: [{"graph": p, "targets": t} for p, t in zip(kept if name == "saprot_kept" else proteins, targets)]
             for name in CONFIGS}

    rows = {}
    for name, config in CONFIGS.items():
        cfg = load_config(str(HERE.parent / config), {"branch": "MF", "ckpt": None})
        task, optimizer = build_task(cfg, esm, options, device)
        assert task.encoder.sequence_model.saprot == name.startswith("saprot")
        data = batches(items[name], args.batch, options["bucket"])
        epoch(task, optimizer, data, device, options)  # warm-up
        rows[name] = {"task": task, "optimizer": optimizer, "data": data}
    times = alternating_times([lambda row=row: epoch(row["task"], row["optimizer"], row["data"], device, options)
                               for row in rows.values()], args.repeats)
    for row, row_times in zip(rows.values(), times):
        row["times"] = row_times

    steps = len(rows["esm2"]["data"])
    base = statistics.median(rows["esm2"]["times"])
    figures = {"device": str(device), "threads": torch.get_num_threads(), "esm": list(esm), "batch": args.batch,
               "proteins": len(proteins), "steps_per_epoch": steps,
               "three_di_ms_per_protein_median": round(statistics.median(three_di_ms), 2)}
    print(f"language model {esm}, batch {args.batch}, {len(proteins)} real structures ({steps} steps per epoch), "
          f"{device}, {torch.get_num_threads()} threads; median of {args.repeats} alternating epochs")
    for name, row in rows.items():
        seconds = statistics.median(row["times"])
        low, high = (t / steps * 1e3 for t in (min(row["times"]), max(row["times"])))
        figures[name] = {"ms_per_step": round(seconds / steps * 1e3, 1), "ratio_to_esm2": round(seconds / base, 3),
                         "ms_per_step_range": [round(low, 1), round(high, 1)]}
        print(f"{name:12s} {seconds / steps * 1e3:8.1f} ms per step  {seconds / base:6.3f}x esm2  "
              f"(epochs {low:.1f}-{high:.1f} ms per step)")
    print(f"3Di per protein: {figures['three_di_ms_per_protein_median']} ms median over {len(proteins)} structures")
    report("saprot_step", **figures)


if __name__ == "__main__":
    main()
