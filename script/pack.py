"""See `python script/pack.py --help` (also installed as `esm-gearnet pack`)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from esm_gearnet.commands.pack import main as pack_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(pack_main())
