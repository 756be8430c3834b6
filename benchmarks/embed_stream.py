"""Embedding a FoldComp database with `embed`: proteins/s of a frozen ESM-2 on one device, against the aim of
3 M proteins an hour on an H200 (about 830 proteins/s).

The real structures FoldComp holds faithfully (`benchmarks/_databases.py`, about 300 residues on average), listed
again and again in a database's index up to --entries entries. `embed`'s sharded path
(`commands.embed_scale.run_sharded`, what `esm-gearnet embed DB -o OUT/` runs): entries decoded in --workers
DataLoader workers, batches of similar length of at most --max-residues residues, written as shards. The encoder
is a random-weight ESM-2 of --esm (layers,width,heads; 33,1280,20 is ESM-2 650M) alone, unpadded
(`attention: varlen`), at --precision (bf16: autocast on CUDA).

Both runs build the model and write their shards the same way: one over --warmup entries, one over --entries;
the rate is the difference of entries over the difference of their times (the marginal rate, without the model's
construction and the first kernels).

    python benchmarks/embed_stream.py [--esm 33,1280,20] [--entries 20000] [--precision bf16] [--device cuda]
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from benchmarks._common import report  # noqa: E402
from benchmarks._databases import real_records, write_repeated  # noqa: E402
from esm_gearnet.commands.embed_scale import run_sharded  # noqa: E402

AIM = 3_000_000 / 3600  # proteins/s: 3 M an hour


def encoder_config(folder: Path, esm) -> Path:
    """A config whose encoder is a random-weight ESM-2 of `esm` (layers, width, heads), unpadded."""
    config = {"dataset": {"class": "DemoFolds"},
              "task": {"class": "MultipleBinaryClassification",
                       "model": {"class": "ESM", "pretrained": False, "architecture": list(esm),
                                 "attention": "varlen"},
                       "criterion": "bce", "metric": ["f1_max"], "num_mlp_layer": 2},
              "optimizer": {"class": "Adam", "lr": 1.0e-4}, "train": {"num_epoch": 1}}
    path = folder / "esm.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def timed_embed(database: Path, output: Path, config: Path, args) -> float:
    started = time.perf_counter()
    result = run_sharded([str(database)], output, str(config), workers=args.workers, device=args.device,
                         max_residues=args.max_residues, progress=False, shard_size=args.shard_size,
                         precision=args.precision)
    if args.device == "cuda":
        torch.cuda.synchronize()
    assert result["skipped"] == [], result["skipped"][:3]
    return time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--esm", default="33,1280,20", help="layers,width,heads of the random ESM-2")
    parser.add_argument("--entries", type=int, default=20000)
    parser.add_argument("--warmup", type=int, default=2000)
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--max-residues", type=int, default=16384, help="residues per batch")
    parser.add_argument("--shard-size", type=int, default=10000)
    args = parser.parse_args()
    esm = tuple(int(v) for v in args.esm.split(","))
    records = real_records(min_length=150)
    lengths = [protein.num_residue for _, _, protein in records]
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        config = encoder_config(folder, esm)
        small = write_repeated(folder / "warmup", records, args.warmup)
        large = write_repeated(folder / "db", records, args.entries)
        first = timed_embed(small, folder / "out_warmup", config, args)
        whole = timed_embed(large, folder / "out", config, args)
    rate = (args.entries - args.warmup) / max(whole - first, 1e-9)
    mean = float(np.mean(lengths))
    print(f"{args.entries} entries of {mean:.0f} residues on average, ESM-2 {args.esm} {args.precision} on "
          f"{args.device}: {rate:.1f} proteins/s ({rate * mean:.0f} residues/s), {rate * 3600 / 1e6:.2f} M an "
          f"hour; the aim: {AIM:.0f} proteins/s")
    report("embed_stream", device=args.device, gpu=torch.cuda.get_device_name() if args.device == "cuda" else None,
           esm=args.esm, precision=args.precision, entries=args.entries, mean_residues=round(mean, 1),
           proteins_per_s=round(rate, 1), residues_per_s=round(rate * mean), million_per_hour=round(rate * 3600 / 1e6, 3),
           aim_proteins_per_s=round(AIM, 1), seconds=round(whole, 2), warmup_seconds=round(first, 2))


if __name__ == "__main__":
    main()
