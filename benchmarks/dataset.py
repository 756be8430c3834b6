"""Dataset preprocessing: structures/s parsed into the packed cache (2 workers), the cache's load time, and
the DataLoader's supply of training batches.

The 46 real structures are replicated (as copies) up to --num-files files so the cache holds a
realistic number of proteins; loading then builds every Protein once, as an epoch would. The loader figure is
one epoch of batches of 8 from the cache with the EC transform (crop to 550) and collation, with 0 and with
--workers worker processes: what the data side can feed a training step, in proteins/s.

    python benchmarks/dataset.py [--num-files 2000] [--workers 2]
"""
import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks._common import median_time, real_structure_files, report  # noqa: E402
from esm_gearnet.checkpoint import digest  # noqa: E402
from esm_gearnet.data import collate  # noqa: E402
from esm_gearnet.data.transforms import TruncateProtein  # noqa: E402
from esm_gearnet.data.datasets.base import StructureDataset  # noqa: E402
from esm_gearnet.data.datasets.cache import load_or_build  # noqa: E402


def loader_rate(proteins, workers, batch_size=8):
    dataset = StructureDataset()  # the datasets' own item path: {"graph", "targets"}, then the transform
    dataset.proteins, dataset.targets = proteins, torch.zeros(len(proteins), 0)
    dataset.transform = TruncateProtein(max_length=550)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         collate_fn=collate)
    start = time.perf_counter()
    count = sum(batch["graph"].batch_size for batch in loader)
    return count / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-files", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    sources = real_structure_files()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "structures"
        folder.mkdir()
        files = []
        for i in range(args.num_files):
            source = sources[i % len(sources)]
            target = folder / f"{i:06d}_{source.name}"
            shutil.copyfile(source, target)
            files.append(target)
        cache = Path(tmp) / "cache.pt"
        start = time.perf_counter()
        proteins, skipped = load_or_build(files, cache, workers=args.workers, progress=False)
        build = time.perf_counter() - start
        start = time.perf_counter()
        loaded, _ = load_or_build(files, cache, workers=args.workers, progress=False)
        open_time = time.perf_counter() - start
        start = time.perf_counter()
        residues = sum(loaded[i].num_residue for i in range(len(loaded)))
        touch_time = time.perf_counter() - start
        size_mb = cache.stat().st_size / 2 ** 20
        mapped = torch.load(cache, weights_only=True, mmap=True)
        digest_time = median_time(lambda: digest(mapped), repeats=3, warmup=0)  # part of the open time
        loader = {workers: loader_rate(loaded, workers) for workers in (0, args.workers)}
    print(f"preprocess {len(files)} files with {args.workers} workers: {build:.1f} s -> {len(files) / build:.0f} "
          f"structures/s ({len(skipped)} skipped); cache {size_mb:.0f} MiB")
    print(f"cache load: {open_time:.2f} s to open (key and digest checks included), {touch_time:.2f} s to build "
          f"all {len(loaded)} proteins ({residues} residues); the digest alone {digest_time:.2f} s "
          f"({digest_time / size_mb * 1024:.2f} s per GiB)")
    print("loader, batches of 8 cropped to 550 and collated: " +
          ", ".join(f"{w} workers {rate:.0f} proteins/s" for w, rate in loader.items()))
    report("dataset", loader_proteins_per_s={str(w): round(r) for w, r in loader.items()}, files=len(files), workers=args.workers, preprocess_s=round(build, 2),
           structures_per_s=round(len(files) / build, 1), cache_open_s=round(open_time, 3),
           cache_iterate_s=round(touch_time, 3), cache_mib=round(size_mb, 1),
           digest_s_per_gib=round(digest_time / size_mb * 1024, 3))


if __name__ == "__main__":
    main()
