"""`esm-gearnet demo`: the built-in demo, offline, from any folder (a pip-installed package included).

First the data pipeline: a few ideal backbones (helix, strand, loop geometry) written as PDB files, parsed back,
packed into a batch and given the EC residue graph (SequentialEdge(2) + SpatialEdge(10, 5) + KNNEdge(10, 5)),
printing what each step produced (structure files or folders given as arguments instead). Then ESM-GearNet
fine-tuned on `DemoFolds` with the packaged `demo/esm_gearnet.yaml`, its run directory under `--output_dir`.

    esm-gearnet demo [STRUCTURE_FILE_OR_FOLDER ...] [--output_dir output/demo] [--pipeline-only]
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import List, Optional, Sequence

from .arguments import demo_parser
from .exits import one_sentence

DEMO_PROTEINS = [
    ("helix_bundle", "MSEELLKKAEELLKRAEELGLSPEEIAKLLEEAAKRG", "LHHHHHHHHHHHHHHHHHLLLHHHHHHHHHHHHHHHL"),
    ("hairpin", "GKTWTVEVNGKKYTVEVSG", "LEEEEEELLLLEEEEEELL"),
    ("mixed", "MKVLIVGAGPSGLAEALRLAEEGHEVTVLE", "LEEEEELLLLHHHHHHHHHHHLLLEEEEEL"),
]


def pipeline(inputs: Sequence[str] = ()) -> None:
    """The data pipeline on `inputs` (structure files or folders; default: generated backbones), printed."""
    import torch

    from ..data import (AlphaCarbonNode, GraphConstruction, KNNEdge, ProteinBatch, SequentialEdge, SpatialEdge,
                        load_structures)
    from ..data.io import is_structure_file
    from ..data.synthetic import backbone_protein, write_pdb

    with tempfile.TemporaryDirectory() as tmp:
        if inputs:
            paths = []
            for item in map(Path, inputs):
                paths += sorted(p for p in item.iterdir() if is_structure_file(p)) if item.is_dir() else [item]
        else:
            paths = []
            for name, sequence, ss in DEMO_PROTEINS:
                paths.append(Path(tmp) / f"{name}.pdb")
                write_pdb(backbone_protein(sequence, ss, name=name), paths[-1])
            print(f"wrote {len(paths)} ideal backbones (helix, strand, loop geometry) as PDB files")
        start = time.perf_counter()
        proteins, skipped = load_structures(paths, progress=False)
        print(f"parsed {len(proteins)} structures in {1e3 * (time.perf_counter() - start):.1f} ms, "
              f"skipped {len(skipped)}")
        for path, reason in skipped:
            print(f"  skipped: {reason}")
        if not proteins:
            raise SystemExit("nothing to show: no structure could be read.")
        for protein in proteins[:10]:
            print(f"  {protein.name:>20s}  {protein.num_residue:4d} residues  chains {','.join(protein.chain_ids)}  "
                  f"{protein.sequence[:40]}{'...' if protein.num_residue > 40 else ''}")
    model = GraphConstruction([AlphaCarbonNode()], [SequentialEdge(2), SpatialEdge(10.0, 5), KNNEdge(10, 5)],
                              edge_feature="gearnet")
    batch = ProteinBatch.pack(proteins)
    graph = model(batch)
    per_relation = torch.bincount(graph.edge_list[:, 2], minlength=graph.num_relation).tolist()
    print(f"batch: {batch.batch_size} proteins, {batch.num_residue} residues")
    print(f"EC graph: {len(graph.edge_list)} edges, {graph.num_relation} relations "
          f"(sequential offsets -2..2, spatial, knn: {per_relation}), edge features {tuple(graph.edge_feature.shape)}")


@one_sentence
def main(argv: Optional[List[str]] = None) -> int:
    args = demo_parser().parse_args(argv)
    pipeline(args.inputs)
    if args.pipeline_only:
        return 0
    from .finetune import run_downstream

    run_downstream(["-c", "demo/esm_gearnet.yaml", "--output_dir", args.output_dir])
    return 0
