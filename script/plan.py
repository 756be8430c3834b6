"""See `python script/plan.py --help` (also installed as `esm-gearnet plan`)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from esm_gearnet.commands.plan import main as plan_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(plan_main())
