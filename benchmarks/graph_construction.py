"""Graph construction throughput with the EC layers on the real structures, batches of 8.

SequentialEdge(2) + SpatialEdge(10, 5) + KNNEdge(10, 5), edge features "gearnet", on one device (--device, default
cuda when present: on a GPU no CPU row is run).

    python benchmarks/graph_construction.py [--batch-size 8] [--repeats 5] [--device cpu|cuda] [--max-proteins N]
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks._common import median_time, real_structure_files, report  # noqa: E402
from esm_gearnet.data import (AlphaCarbonNode, GraphConstruction, KNNEdge, ProteinBatch, SequentialEdge,  # noqa: E402
                              SpatialEdge, SpatialLineGraph, load_structure)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--max-proteins", type=int, default=None, help="the first N real structures (default: all)")
    args = parser.parse_args()
    proteins = [load_structure(p) for p in real_structure_files()[:args.max_proteins]]
    model = GraphConstruction([AlphaCarbonNode()], [SequentialEdge(2), SpatialEdge(10.0, 5), KNNEdge(10, 5)],
                              edge_feature="gearnet")
    line_graph = SpatialLineGraph(8)
    for device in [args.device]:
        batches = [ProteinBatch.pack(proteins[i:i + args.batch_size]).to(device)
                   for i in range(0, len(proteins), args.batch_size)]
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

        def run(fn):
            def go():
                for batch in batches:
                    fn(batch)
                sync()
            return go

        seconds = median_time(run(model), args.repeats)
        graphs = [model(b) for b in batches]
        edges = sum(len(g.edge_list) for g in graphs)
        line_seconds = median_time(lambda: [line_graph(g) for g in graphs] and sync(), args.repeats)
        print(f"{device}: {len(proteins) / seconds:8.1f} proteins/s  ({edges} edges over {len(proteins)} proteins, "
              f"batches of {args.batch_size}); spatial line graph {len(proteins) / line_seconds:.1f} proteins/s")
        report("graph_construction", device=device, batch_size=args.batch_size, proteins=len(proteins),
               proteins_per_s=round(len(proteins) / seconds, 1), edges=edges,
               line_graph_proteins_per_s=round(len(proteins) / line_seconds, 1),
               threads=torch.get_num_threads())


if __name__ == "__main__":
    main()
