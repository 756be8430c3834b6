"""Streaming a FoldComp database: proteins decoded per worker against `.pdb.gz` files, the memory of a 1 M-entry
index, and the time from opening one to the first batch.

The real structures of ../shared/data that FoldComp holds faithfully (`benchmarks/_databases.py`), those of at
least --min-length residues (about 300 on average: the AlphaFold models of 153 and 515 residues and the
experimental chains of 150-500), in databases whose index lists them again and again (the data file holds each
once) up to 10 k and --entries (1 M) entries.

1. Decoding, in this process at one thread (as in a DataLoader worker): `FoldCompDB.item` of --sample entries,
   with the pre-training configs' transform (`ProteinView(view="residue")`, `TruncateProtein(max_length=100,
   random=True)`), with and without 3Di states (`three_di=True`); side by side the same proteins from `.pdb.gz`
   files (the PDB text each record was made from, gzipped) through the file datasets' path (`read_structure_arrays`,
   3Di added the same way, the same seeded transform); and `foldcomp.get_data` of the records alone. The paths
   alternate within each of --rounds rounds (after a warm-up round); rates from the median round, the
   FoldComp / pdb.gz ratio the median of the rounds' ratios.
2. Memory: resident size (VmRSS) of a fresh process after opening the 10 k-entry database and streaming --batches
   batches of 8 (`engine.stream.loader`, decoded in that process), against the same with the 1 M-entry one.
3. Start-up: in a fresh process, the seconds from `FoldCompDB(path)` to the first batch of 8 out of
   `engine.stream.loader(..., num_workers=1)`.

    python benchmarks/stream.py [--entries 1000000] [--rounds 5] [--sample 112]
"""
import argparse
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks._common import alternating_times, report  # noqa: E402
from esm_gearnet.data.datasets.foldcomp import FoldCompDB  # noqa: E402
from esm_gearnet.data.transforms import Compose, ProteinView, TruncateProtein  # noqa: E402
from esm_gearnet.engine.stream import loader  # noqa: E402

SMALL = 10_000  # entries of the database the 1 M-entry one is compared with
BATCH = 8
TARGETS = {"proteins_per_s": 200, "memory_growth_mb": 128, "first_batch_s": 10}


def pretraining_transform():
    """The transform of config/pretrain/*_foldcomp.yaml."""
    return Compose([ProteinView(view="residue"), TruncateProtein(max_length=100, random=True)])


def file_item(path, seed, transform, three_di):
    """What a file dataset's worker makes of a structure file: parsed, 3Di states added when asked for, then the
    transform with its random draws seeded by `seed` (as `FoldCompDB.item` seeds them)."""
    from esm_gearnet.data.foldseek import add_states
    from esm_gearnet.data.io import read_structure_arrays
    from esm_gearnet.data.protein import Protein

    arrays, meta = read_structure_arrays(path)
    if three_di:
        arrays = add_states(arrays)
    item = {"graph": Protein.from_arrays(arrays, **meta)}
    generator = torch.random.default_generator
    state = generator.get_state()
    generator.manual_seed(seed)
    try:
        return transform(item)
    finally:
        generator.set_state(state)


def decoding(database, gz_files, lengths, args):
    """Part 1: proteins/s and residues/s of each path, in this process at one thread."""
    import foldcomp

    torch.set_num_threads(1)
    transform = pretraining_transform()
    plain = FoldCompDB(database, transform=transform)
    with_3di = FoldCompDB(database, transform=transform, three_di=True)
    entries = range(args.sample)  # entry k is record k mod len(records)
    files = [gz_files[k % len(gz_files)] for k in entries]
    records = [plain.database.record(k) for k in entries]
    residues = sum(lengths[k % len(lengths)] for k in entries)
    paths = {
        "foldcomp": lambda: [plain.item(k, k) for k in entries],
        "foldcomp_3di": lambda: [with_3di.item(k, k) for k in entries],
        "pdb_gz": lambda: [file_item(f, k, transform, False) for k, f in zip(entries, files)],
        "pdb_gz_3di": lambda: [file_item(f, k, transform, True) for k, f in zip(entries, files)],
        "get_data": lambda: [foldcomp.get_data(record) for record in records],
    }
    times = dict(zip(paths, alternating_times(list(paths.values()), args.rounds, warmup=1)))
    figures = {name: {"proteins_per_s": round(args.sample / statistics.median(t), 1),
                      "residues_per_s": round(residues / statistics.median(t))} for name, t in times.items()}
    for plain_name in ("foldcomp", "foldcomp_3di"):
        figures[plain_name]["vs_pdb_gz"] = round(statistics.median(
            gz / fc for gz, fc in zip(times[plain_name.replace("foldcomp", "pdb_gz")], times[plain_name])), 2)
    figures["foldcomp"]["vs_get_data"] = round(statistics.median(
        g / fc for g, fc in zip(times["get_data"], times["foldcomp"])), 2)
    return figures


def child(args):
    """Parts 2 and 3 in a fresh process: one JSON line of figures."""
    def status(field):
        line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field))
        return int(line.split()[1]) * 1024 / 1e6  # kB -> MB

    before = status("VmRSS:")
    start = time.perf_counter()
    dataset = FoldCompDB(args.database, transform=pretraining_transform())
    opened = time.perf_counter() - start
    if args.child == "memory":  # decoded in this process: its resident size is everything the stream costs
        for batch in itertools.islice(loader(dataset, BATCH, 0, 1, seed=0, epoch=0), args.batches):
            assert batch["graph"].batch_size == BATCH
        figures = {"rss_before_mb": before, "rss_mb": status("VmRSS:"), "peak_rss_mb": status("VmHWM:")}
    else:
        batch = next(iter(loader(dataset, BATCH, 0, 1, seed=0, epoch=0, num_workers=1)))
        figures = {"open_s": opened, "first_batch_s": time.perf_counter() - start,
                   "proteins": batch["graph"].batch_size}
    print(json.dumps({"entries": len(dataset), **figures}))


def in_fresh_process(mode, database, args):
    done = subprocess.run([sys.executable, __file__, "--child", mode, "--database", str(database), "--batches",
                           str(args.batches)], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"the {mode} process on {database} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1_000_000, help="entries of the large database")
    parser.add_argument("--min-length", type=int, default=150, help="real structures kept: at least this long")
    parser.add_argument("--sample", type=int, default=112, help="proteins decoded per path and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=20, help="batches streamed in the memory processes")
    parser.add_argument("--child", choices=["memory", "first_batch"], help=argparse.SUPPRESS)  # internal
    parser.add_argument("--database", help=argparse.SUPPRESS)  # internal: the child's database
    args = parser.parse_args()
    if args.child:
        return child(args)

    from benchmarks._databases import real_records, write_gz_files, write_repeated

    records = real_records(min_length=args.min_length)
    lengths = [protein.num_residue for _, _, protein in records]
    print(f"{len(records)} real structures of at least {args.min_length} residues that FoldComp holds "
          f"faithfully, {np.mean(lengths):.0f} residues on average", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        small = write_repeated(Path(tmp) / "small", records, SMALL)
        large = write_repeated(Path(tmp) / "large", records, args.entries)
        print(f"databases of {SMALL} and {args.entries} entries written in {time.perf_counter() - start:.1f} s "
              f"(index {Path(f'{large}.index').stat().st_size / 1e6:.0f} MB, lookup "
              f"{Path(f'{large}.lookup').stat().st_size / 1e6:.0f} MB)", flush=True)
        gz_files = write_gz_files(Path(tmp) / "gz", records)
        sizes = {"record_bytes": round(float(np.mean([len(record) for _, record, _ in records]))),
                 "pdb_gz_bytes": round(float(np.mean([f.stat().st_size for f in gz_files])))}
        print(f"bytes per protein: {sizes}", flush=True)

        decode = decoding(small, gz_files, lengths, args)
        for name, figures in decode.items():
            print(f"{name:13s} {figures}", flush=True)

        memory = {"small": in_fresh_process("memory", small, args), "large": in_fresh_process("memory", large, args)}
        growth = memory["large"]["rss_mb"] - memory["small"]["rss_mb"]
        print(f"memory {memory}; growth {growth:.1f} MB", flush=True)

        first = {"small": in_fresh_process("first_batch", small, args),
                 "large": in_fresh_process("first_batch", large, args)}
        print(f"first batch {first}", flush=True)

    def rounded(row):
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}

    report("stream", structures=len(records), mean_residues=round(float(np.mean(lengths)), 1),
           sample=args.sample, rounds=args.rounds, batch=BATCH, decode=decode, **sizes,
           memory={k: rounded(v) for k, v in memory.items()}, memory_growth_mb=round(growth, 1),
           first_batch={k: rounded(v) for k, v in first.items()}, targets=TARGETS)


if __name__ == "__main__":
    main()
