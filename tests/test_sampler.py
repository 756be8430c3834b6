"""Length-bucketed batches: every protein once per epoch, ranks disjoint and in step, deterministic per epoch,
far less padding than random batches; the engine trains with them."""
import torch

from esm_gearnet.engine.sampler import LengthBucketSampler


def _padded(batches, lengths):
    return sum(len(b) * max(lengths[i] for i in b) for b in batches)


def test_every_protein_once_ranks_disjoint_and_in_step():
    torch.manual_seed(0)
    lengths = torch.randint(30, 1000, (400,)).tolist()
    ranks = [LengthBucketSampler(lengths, batch_size=8, num_replicas=2, rank=r, seed=3) for r in range(2)]
    for sampler in ranks:
        sampler.set_epoch(5)
    per_rank = [list(s) for s in ranks]
    assert len(per_rank[0]) == len(per_rank[1]) == len(ranks[0]) == 25  # same number of steps on both ranks
    seen = sorted(i for batches in per_rank for b in batches for i in b)
    assert seen == list(range(400))
    for a, b in zip(*per_rank):  # the two halves of one global batch: similar lengths
        assert abs(max(lengths[i] for i in a) - max(lengths[i] for i in b)) < 200
    again = LengthBucketSampler(lengths, batch_size=8, num_replicas=2, rank=0, seed=3)
    again.set_epoch(5)
    assert list(again) == per_rank[0]
    again.set_epoch(6)
    assert list(again) != per_rank[0]


def test_bucketing_cuts_padding():
    torch.manual_seed(1)
    lengths = torch.randint(30, 1000, (2000,)).tolist()
    bucketed = list(LengthBucketSampler(lengths, batch_size=8))
    order = torch.randperm(2000).tolist()
    random_batches = [order[i:i + 8] for i in range(0, 2000, 8)]
    real = sum(lengths)
    assert _padded(bucketed, lengths) < 1.05 * real < 0.7 * _padded(random_batches, lengths)


def test_uneven_sizes_fill_the_last_global_batch():
    lengths = list(range(10, 31))  # 21 proteins, global batch 2 x 4
    batches = [list(LengthBucketSampler(lengths, batch_size=4, num_replicas=2, rank=r)) for r in range(2)]
    assert len(batches[0]) == len(batches[1]) == 3
    assert set(i for b in batches[0] + batches[1] for i in b) == set(range(21))


def test_engine_trains_with_buckets():
    from esm_gearnet.config import load_config
    from esm_gearnet.commands.finetune import build_downstream
    from pathlib import Path

    config = Path(__file__).resolve().parents[1] / "config" / "demo" / "esm_gearnet.yaml"
    cfg = load_config(str(config), {"num_protein": 40, "batch_norm": None, "num_epoch": 1, "batch_size": 8,
                                    "output_dir": None})
    cfg.engine.bucket = True
    engine = build_downstream(cfg, None, seed=0, progress=False)
    record = engine.train_epoch()
    assert torch.isfinite(torch.tensor(record["loss"])) and engine.step == 4
