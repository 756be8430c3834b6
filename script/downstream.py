"""Fine-tune on a downstream task.

    python script/downstream.py -c config/EC/esm_gearnet.yaml [-s SEED] [--ckpt WEIGHTS] [--resume RUN_DIR]
    torchrun --nproc_per_node=4 script/downstream.py -c config/EC/esm_gearnet.yaml
    python -m torch.distributed.launch --nproc_per_node=4 script/downstream.py -c config/EC/esm_gearnet.yaml
Every Jinja variable of the config ({{ branch }}, ...) is an option too: --branch MF.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from esm_gearnet.commands.finetune import main as downstream_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(downstream_main())
