"""Pre-train an encoder with a self-supervised objective.

    python script/pretrain.py -c config/pretrain/mc_esm_gearnet.yaml [-s SEED] [--resume RUN_DIR]
    torchrun --nproc_per_node=4 script/pretrain.py -c config/pretrain/mc_esm_gearnet.yaml
    python -m torch.distributed.launch --nproc_per_node=4 script/pretrain.py -c config/pretrain/mc_esm_gearnet.yaml
The run directory receives model_epoch_N.pth every save_interval epochs: fine-tune from it with
script/downstream.py -c CONFIG --ckpt RUN_DIR/model_epoch_N.pth.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from esm_gearnet.commands.pretrain import main as pretrain_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(pretrain_main())
