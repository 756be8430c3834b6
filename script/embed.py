"""See `python script/embed.py --help` (also installed as `esm-gearnet embed`)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from esm_gearnet.commands.embed import main as embed_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(embed_main())
