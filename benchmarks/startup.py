"""Start-up of a pretrained ESM-2: `ESM(path, model)` built from a fair-esm file, against reading that file whole.

    python benchmarks/startup.py [--sizes 150M,650M] [--repeats 2] [--compare OTHER_TREE]

For each size it writes a file in fair-esm's official layout (random weights, fp32, into a temporary folder that
is removed after; 650M needs 2.6 GB of disk and is skipped with a sentence where there is less), then measures,
each in a fresh process, best of `--repeats` with a warm page cache:

  read       `torch.load(file, map_location="cpu")`, the whole file into memory
  build      `ESM(path=folder, model=stem)` of this tree
  before     the same with the package of OTHER_TREE (`--compare`: a checkout of another commit)

Each ends with one read of every memory page of the weights (a memory-mapped file is read when first used), so
the figures are those of weights ready in memory. Seconds and peak resident memory above the process's own after its imports (`VmHWM` - `VmRSS`, GiB), then the
ratios the goal is stated in: build time / read time (goal ≤ 1.5) and build peak / the weights' size (goal ≤ 1.2).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._common import report  # noqa: E402

SIZES = {"8M": "ESM-2-8M", "35M": "ESM-2-35M", "150M": "ESM-2-150M", "650M": "ESM-2-650M"}


# one measurement, in a fresh process of the tree measured (`python -c`, run in that tree: its package is imported)
WORKER = """
import json, sys, time
from pathlib import Path

import torch


def memory(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024


mode, folder, stem = sys.argv[1:]
from esm_gearnet.models import ESM

torch.set_num_threads(2)
base = memory("VmRSS")
start = time.perf_counter()
if mode == "read":
    loaded = torch.load(Path(folder) / (stem + ".pt"), map_location="cpu", weights_only=False)
else:
    loaded = ESM(path=folder, model=stem).state_dict()
for value in loaded["model"].values() if mode == "read" else loaded.values():  # every page in memory
    if value.numel():
        float(value.reshape(-1)[::1024].float().sum())
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_bytes": memory("VmHWM") - base, "file": sys.modules["esm_gearnet"].__file__}))
"""


def write_checkpoint(folder: Path, name: str) -> tuple:
    """(stem, bytes of weights): a fair-esm file of `name`'s architecture with random weights."""
    import argparse as ap

    import torch

    from esm_gearnet.checkpoint import skipping_init
    from esm_gearnet.models.esm import ARCHITECTURES, build_esm2

    stem, layers, dim, heads = ARCHITECTURES[name]
    with skipping_init():  # filled below, faster than the modules' own initialisation
        model, _ = build_esm2(layers, dim, heads)
    generator = torch.Generator().manual_seed(0)
    state, size = {}, 0
    for key, value in model.state_dict().items():
        if key.startswith("contact_head"):
            continue
        value = torch.randn(value.shape, generator=generator) * 0.02 if value.is_floating_point() else value
        prefix = "encoder." if key.startswith("lm_head") else "encoder.sentence_encoder."
        state[prefix + key] = value
        size += value.numel() * value.element_size()
    cfg = ap.Namespace(encoder_layers=layers, encoder_embed_dim=dim, encoder_attention_heads=heads,
                       token_dropout=True)
    torch.save({"model": state, "cfg": {"model": cfg}}, folder / f"{stem}.pt")
    return stem, size


def measure(mode: str, folder: Path, stem: str, tree: Path, repeats: int) -> dict:
    """Best seconds and peak over `repeats` fresh processes importing the package of `tree`."""
    runs = []
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "2"}
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", WORKER, mode, str(folder), stem], env=env, cwd=tree,
                             capture_output=True, text=True, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        assert runs[-1]["file"].startswith(str(tree)), f"measured {runs[-1]['file']}, not the tree {tree}"
    return {"seconds": min(r["seconds"] for r in runs), "peak_gib": min(r["peak_bytes"] for r in runs) / 2 ** 30}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="150M,650M", help="comma-separated: " + ", ".join(SIZES))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--compare", type=Path, default=None, help="another checkout, measured as `before`")
    args = parser.parse_args()
    results = {}
    for size in args.sizes.split(","):
        name = SIZES[size]
        folder = Path(tempfile.mkdtemp(prefix=f"startup-{size}-"))
        try:
            from esm_gearnet.models.esm import ARCHITECTURES

            _, layers, dim, _ = ARCHITECTURES[name]
            needed = (12 * layers * dim * dim + 33 * dim) * 4 * 1.1  # the weights in fp32, with room
            if shutil.disk_usage(folder).free < needed:
                print(f"{size}: skipped, {needed / 2 ** 30:.1f} GiB of free disk needed in {folder.parent}")
                continue
            stem, weights = write_checkpoint(folder, name)
            measure("read", folder, stem, ROOT, 1)  # warms the page cache
            row = {"weights_gib": weights / 2 ** 30, "read": measure("read", folder, stem, ROOT, args.repeats),
                   "build": measure("build", folder, stem, ROOT, args.repeats)}
            if args.compare:
                row["before"] = measure("build", folder, stem, args.compare.resolve(), args.repeats)
            for key in ("build", "before"):
                if key in row:
                    row[key]["time_vs_read"] = row[key]["seconds"] / row["read"]["seconds"]
                    row[key]["peak_vs_weights"] = row[key]["peak_gib"] / row["weights_gib"]
            results[size] = row
            print(f"ESM-2 {size} ({row['weights_gib']:.2f} GiB of weights): read {row['read']['seconds']:.2f} s, "
                  f"peak {row['read']['peak_gib']:.2f} GiB")
            for key in ("build", "before"):
                if key in row:
                    r = row[key]
                    print(f"  {key:<7} {r['seconds']:6.2f} s ({r['time_vs_read']:.2f}x the read), peak "
                          f"{r['peak_gib']:.2f} GiB ({r['peak_vs_weights']:.2f}x the weights)")
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    report("startup", sizes=results, cpu_threads=2)


if __name__ == "__main__":
    main()
