"""See `python script/predict.py --help` (also installed as `esm-gearnet predict`)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from esm_gearnet.commands.predict import main as predict_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(predict_main())
