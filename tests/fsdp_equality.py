"""Five training steps of small fused models under `ddp` and `fsdp` (or in one process), recorded for
tests/test_sharding.py: run as `torchrun --nproc_per_node=W tests/fsdp_equality.py OUT` (every variant and both
strategies in one launch) or `python tests/fsdp_equality.py OUT` (the single-process reference); `... save FOLDER`
then `... load FOLDER` with another number of processes: a sharded checkpoint resharded.

Every rank trains on its slice of the same global batches of 8 proteins; dropout is 0 and batch norms use their
running statistics (eval mode), the two things that differ by design between one process and several."""
import os
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import small  # noqa: E402
from esm_gearnet import distributed, sharding  # noqa: E402
from esm_gearnet.commands.run import building  # noqa: E402
from esm_gearnet.assembly import build_optimizer, build_task, model_config, runtime_task_list  # noqa: E402
from esm_gearnet.config import load_config  # noqa: E402
from esm_gearnet.data import collate  # noqa: E402
from esm_gearnet.engine import Engine  # noqa: E402
from esm_gearnet.registry import build  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"gearnet_series": "esm_gearnet", "gearnet_parallel": "esm_gearnet_parallel",
            "gearnet_cross": "esm_gearnet_cross", "gvp_series": "esm_gvp", "cdconv_series": "esm_cdconv",
            # through the engine's own loop: 2 batches a step, activation checkpointing, the unpadded path
            "gearnet_series_accumulated": "esm_gearnet",
            # a frozen language model with a feature cache (off under fsdp)
            "gearnet_series_frozen": "esm_gearnet",
            # pretrained weights from a fair-esm file holding fp16 (cast unit by unit under fsdp)
            "gearnet_series_fp16_file": "esm_gearnet",
            # LoRA adapters on the language model (the base frozen), on random and on a file's weights
            "gearnet_series_lora": "esm_gearnet", "gearnet_cross_lora_fp16_file": "esm_gearnet_cross",
            # ESM C: its blocks as units, and LoRA on its fused projection
            "esmc_series": "esm_gearnet", "esmc_series_lora": "esm_gearnet"}
GLOBAL_BATCH, STEPS = 8, 5


def config(variant: str):
    cfg = load_config(str(ROOT / "config" / "EC" / f"{VARIANTS[variant]}.yaml"), {})
    demo = load_config(str(ROOT / "config" / "demo" / "esm_gearnet.yaml"), {"num_protein": 40})
    cfg.dataset = demo.dataset
    small(model_config(cfg)[0])
    cfg.engine = {"batch_size": GLOBAL_BATCH // distributed.world_size(), "clip_norm": 1.0}
    sequence = model_config(cfg)[0]["sequence_model"]
    if variant.startswith("esmc"):
        sequence["model"] = "ESM-C-300M"
    if variant.endswith("accumulated"):
        sequence.update({"attention": "varlen", "activation_checkpointing": True})
        cfg.engine.update({"batch_size": GLOBAL_BATCH // 2 // distributed.world_size(), "gradient_interval": 2})
    if variant.endswith("frozen"):
        sequence["feature_cache_gib"] = 0.1
        cfg.fix_sequence_model = True
    if variant.endswith("fp16_file"):
        sequence.update({"pretrained": True, "path": str(fp16_file().parent), "model": fp16_file().stem})
        sequence.pop("architecture")
    if "lora" in variant:
        sequence["lora"] = {"rank": 4, "alpha": 8.0, "targets": None if variant.startswith("esmc") else
                            ["q_proj", "v_proj", "fc1"]}
        # SGD: the adapters' first gradients are near 0 (B starts at 0), where Adam's update g / (|g| + eps) turns
        # rounding differences of 1e-12 into differences of the learning rate's size
        cfg.optimizer = {"class": "SGD", "lr": 0.05, "momentum": 0.9}
    return cfg


def fp16_file() -> Path:
    """A fair-esm ESM-2 file (2 layers x 32) of random weights stored in fp16, in $FSDP_EQUALITY_WEIGHTS; written
    by the first (single-process) run."""
    import argparse

    from esm_gearnet.models.esm.architecture import build_esm2

    file = Path(os.environ["FSDP_EQUALITY_WEIGHTS"]) / "esm2_t2_32_fp16.pt"
    if not file.exists() and distributed.world_size() == 1:
        torch.manual_seed(7)
        model, _ = build_esm2(2, 32, 4)
        state = {("encoder." if k.startswith("lm_head") else "encoder.sentence_encoder.") + k: v.half()
                 for k, v in model.state_dict().items() if not k.startswith("contact_head")}
        cfg = argparse.Namespace(encoder_layers=2, encoder_embed_dim=32, encoder_attention_heads=4, token_dropout=True)
        torch.save({"model": state, "cfg": {"model": cfg}}, file)
    return file


def deterministic(task: nn.Module) -> None:
    """Dropout 0 and batch norms on their running statistics: what differs by design between 1 and W processes."""
    for module in task.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
            module.train = lambda mode=True, m=module: m  # stays in eval mode
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(module, nn.MultiheadAttention):
            module.dropout = 0.0
        for name in ("drop_rate", "dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)


def train(engine: Engine) -> list:
    """STEPS steps on the same global batches of GLOBAL_BATCH proteins, each rank its slice; the mean loss of each."""
    data, rank, size = engine.sets["train"], distributed.rank(), distributed.world_size()
    losses = []
    for step in range(STEPS):
        items = [data[(step * GLOBAL_BATCH + i) % len(data)] for i in range(GLOBAL_BATCH)]
        share = GLOBAL_BATCH // size
        loss, _ = engine.model(collate(items[rank * share:(rank + 1) * share]))
        engine.stepper.backward(loss)
        engine.stepper.step(engine.task.parameters())
        engine.step += 1
        losses.append(sum(distributed.gather_objects(float(loss.detach()))) / size)
    return losses


def run(variant: str, strategy: str):
    engine = _engine(variant, strategy)
    if variant.endswith("accumulated"):  # one epoch of the engine's loop: the same global batches for any W
        losses = [engine.train_epoch()["loss"]]
        assert engine.step == len(engine.sets["train"]) // GLOBAL_BATCH
    else:
        losses = train(engine)
    state = sharding.full_state_dict(engine.task) if engine.sharded else engine.task.state_dict()
    return {"losses": losses, "state": {k: v.detach().cpu().clone() for k, v in state.items() if torch.is_tensor(v)}}


def reshard(folder: str, save: bool) -> None:
    """`save`: train gearnet_series 5 steps under fsdp and save `folder/last.pth` (sharded) with the full weights
    and optimizer state beside it (`expected.pt`); else resume from it with this world size and save what was
    loaded (`loaded-W.pt`)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    engine = _engine("gearnet_series", "fsdp", folder)
    if save:
        train(engine)
        engine.save("last.pth")
    else:
        engine.resume(Path(folder) / "last.pth")
    whole = StateDictOptions(full_state_dict=True, cpu_offload=True)  # on rank 0; the others get {}
    optimizer = get_optimizer_state_dict(engine.task, engine.stepper.optimizer, options=whole)
    result = {"step": engine.step, "model": sharding.full_state_dict(engine.task), "optimizer": optimizer.get("state")}
    if distributed.rank() == 0:
        torch.save(result, Path(folder) / ("expected.pt" if save else f"loaded-{distributed.world_size()}.pt"))


def _engine(variant: str, strategy: str, run_dir=None) -> Engine:
    cfg = config(variant)
    cfg.engine["strategy"] = strategy
    dataset = build(cfg.dataset, "dataset")
    train = dataset.split()[0]
    torch.manual_seed(0)
    with building(cfg):  # what the commands do: under fsdp, weights from files keep their dtype until sharded
        task = build_task(cfg, runtime_task_list(cfg, dataset.tasks))
    if variant == "gearnet_series_fp16_file":
        dtypes = {p.dtype for p in task.encoder.sequence_model.model.layers.parameters()}
        assert dtypes == ({torch.float16} if strategy == "fsdp" and distributed.world_size() > 1 else
                          {torch.float32}), dtypes
    task.preprocess(train)
    deterministic(task)
    return Engine(task, train, None, None, build_optimizer(cfg, task), progress=False, run_dir=run_dir, config=cfg,
                  **cfg.engine)


def main(argv) -> None:
    torch.set_num_threads(1)
    distributed.init()
    if argv[0] in ("save", "load"):
        reshard(argv[1], argv[0] == "save")
    else:
        strategies = ["ddp", "fsdp"] if distributed.world_size() > 1 else ["ddp"]
        results = {(variant, strategy): run(variant, strategy) for variant in VARIANTS for strategy in strategies}
        if distributed.rank() == 0:
            torch.save({f"{v}/{s}": r for (v, s), r in results.items()}, argv[0])
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
