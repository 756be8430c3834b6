"""Structure encoders: forward + backward time per batch of 8 real proteins (proteins/s).

GearNet 6 x 512 on the EC graph (input 21, as in parallel fusion), GearNet-Edge (3 x 512, line graph), and
GVP-GNN with the original's settings on its radius graph, CDConv with the original's settings (its own
radius graphs, built inside the timed step); CPU, and CUDA when present. Graph construction is
done once outside the timing. Median of repeats after warm-up. The GearNets run twice: with their relational
aggregation as one sparse-dense product (the default) and as the reference gather + `index_add_`
(`aggregation: scatter`, "index_add_"). One device per run (--device, default cuda when present: on a GPU no CPU
row is run); the encoders are built on it.

    python benchmarks/encoders.py [--batch-size 8] [--repeats 3] [--device cpu|cuda] [--width 512]
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks._common import median_time, real_structure_files, report  # noqa: E402
from esm_gearnet.data import (AlphaCarbonNode, GraphConstruction, KNNEdge, ProteinBatch, SequentialEdge,  # noqa: E402
                              SpatialEdge, load_structure)
from esm_gearnet.models import CDConv, GVPGNN, GearNet, residue_one_hot  # noqa: E402


def encoders(width=512):
    """name -> (graph construction, builder); `width` 512 gives the original's sizes (the rehearsal shrinks it)."""
    ec = GraphConstruction([AlphaCarbonNode()], [SequentialEdge(2), SpatialEdge(10.0, 5), KNNEdge(10, 5)],
                           edge_feature="gearnet")
    radius = GraphConstruction([AlphaCarbonNode()], [SpatialEdge(10.0, 0)])
    gearnet = {f"GearNet-6x{width}": dict(hidden_dims=[width] * 6, readout="sum"),
               f"GearNet-Edge-3x{width}": dict(hidden_dims=[width] * 3, edge_input_dim=59, num_angle_bin=8)}
    # the GearNets twice: their relational aggregation as one sparse-dense product (the default) and as the
    # reference path, gather + index_add_ (`aggregation: scatter`)
    return {
        **{name + suffix: (ec, lambda options=options, aggregation=aggregation: GearNet(
            21, num_relation=7, batch_norm=True, concat_hidden=True, short_cut=True, aggregation=aggregation,
            **options)) for name, options in gearnet.items()
           for suffix, aggregation in (("", "sparse"), (" (index_add_)", "scatter"))},
        "GVP-GNN": (radius, lambda: GVPGNN([21, 0], [width // 2, 16], [16, 1], [64, 1], readout="mean",
                                           num_layers=5, drop_rate=0.1, vector_gate=True)),
        "CDConv": (AlphaCarbonNode(), lambda: CDConv(21, 16, [width // 2, width, 2 * width, 4 * width],
                                                     [8.0, 12.0, 16.0, 20.0], 21, [32], base_width=16.0,
                                                     dropout=0.2)),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--width", type=int, default=512, help="hidden width (512: the original's sizes)")
    args = parser.parse_args()
    proteins = [load_structure(p) for p in real_structure_files()[: args.batch_size]]
    for device in [args.device]:
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        for name, (graph_model, make) in encoders(args.width).items():
            torch.manual_seed(0)
            with torch.device(device):
                model = make().train()
            graph = graph_model(ProteinBatch.pack(proteins).to(device))
            features = residue_one_hot(graph)

            def step():
                out = model.network(graph, features)
                out["graph_feature"].sum().backward()
                model.zero_grad(set_to_none=True)
                sync()

            seconds = median_time(step, args.repeats)
            print(f"{device} {name:>32s}: {seconds:.3f} s per batch of {len(proteins)} "
                  f"({graph.num_residue} residues) -> {len(proteins) / seconds:.1f} proteins/s")
            report("encoders", device=device, encoder=name, batch_size=len(proteins), residues=graph.num_residue,
                   seconds_per_batch=round(seconds, 4), proteins_per_s=round(len(proteins) / seconds, 2),
                   threads=torch.get_num_threads())


if __name__ == "__main__":
    main()
