"""Built-in demo of the data pipeline; needs no download (`esm-gearnet demo --pipeline-only`).

Builds a few ideal backbones (helix, strand, loop geometry), writes them as PDB files, parses them back,
packs them into a batch and constructs the EC residue graph (SequentialEdge(2) + SpatialEdge(10, 5) +
KNNEdge(10, 5)), printing what each step produced. Pass structure files or folders to run it on them instead.

    python script/demo.py [STRUCTURE_FILE_OR_FOLDER ...]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from esm_gearnet.commands.demo import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main([*sys.argv[1:], "--pipeline-only"]))
