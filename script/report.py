"""See `python script/report.py --help` (also installed as `esm-gearnet report`)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from esm_gearnet.commands.report import main as report_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(report_main())
