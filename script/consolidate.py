"""See `python script/consolidate.py --help` (also installed as `esm-gearnet consolidate`)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from esm_gearnet.commands.consolidate import main as consolidate_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(consolidate_main())
