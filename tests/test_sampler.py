"""Length-bucketed batches: every protein once per epoch, ranks disjoint and in step, deterministic per epoch,
far less padding than random batches; the engine trains with them."""
from collections import Counter

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


def test_batches_are_length_buckets_in_random_order():
    """One pool (50 global batches of 8: the whole epoch): the batches are consecutive runs of the length-sorted
    order, so no two batches' length ranges overlap; they come in a shuffled order, not longest first."""
    lengths = (torch.randperm(400, generator=torch.Generator().manual_seed(2)) + 30).tolist()  # no ties
    for epoch in range(3):
        sampler = LengthBucketSampler(lengths, batch_size=8, seed=0)
        sampler.set_epoch(epoch)
        batches = list(sampler)
        ranges = sorted((min(lengths[i] for i in b), max(lengths[i] for i in b)) for b in batches)
        assert len(ranges) == 50 and all(high < low for (_, high), (low, _) in zip(ranges, ranges[1:]))
        longest = [max(lengths[i] for i in b) for b in batches]
        assert longest not in (sorted(longest), sorted(longest, reverse=True))


def test_batches_are_far_closer_in_length_than_random_batches():
    """Five pools of 400 random proteins: within a batch the lengths differ by a small fraction of what they do in
    random batches of the same size."""
    torch.manual_seed(1)
    lengths = torch.randint(30, 1000, (2000,)).tolist()
    order = torch.randperm(2000).tolist()

    def spread(batches):  # mean over batches of longest - shortest
        return sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)

    bucketed = list(LengthBucketSampler(lengths, batch_size=8))
    assert spread(bucketed) < 0.05 * spread([order[i:i + 8] for i in range(0, 2000, 8)])


def test_every_protein_exactly_once_per_epoch():
    lengths = torch.randint(30, 1000, (400,), generator=torch.Generator().manual_seed(3)).tolist()
    sampler = LengthBucketSampler(lengths, batch_size=8, seed=1)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler) == 50 and all(len(b) == 8 for b in batches)
        assert sorted(i for b in batches for i in b) == list(range(400))


def test_order_is_determined_by_seed_and_epoch_alone():
    lengths = torch.randint(30, 1000, (400,), generator=torch.Generator().manual_seed(4)).tolist()

    def batches(seed, epoch):
        sampler = LengthBucketSampler(lengths, batch_size=8, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    torch.manual_seed(0)
    first = batches(5, 2)
    torch.manual_seed(1)  # the global random stream plays no part
    assert batches(5, 2) == first
    assert batches(6, 2) != first and batches(5, 3) != first


def test_uneven_sizes_fill_the_last_global_batch():
    """21 proteins, global batch 2 x 4: 3 batches per rank, the 24 places filled by every protein once and the
    first 3 of the epoch's order a second time (as DistributedSampler pads)."""
    lengths = list(range(10, 31))
    batches = [list(LengthBucketSampler(lengths, batch_size=4, num_replicas=2, rank=r)) for r in range(2)]
    assert len(batches[0]) == len(batches[1]) == 3
    counts = Counter(i for b in batches[0] + batches[1] for i in b)
    assert set(counts) == set(range(21)) and sorted(counts.values()) == [1] * 18 + [2] * 3


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
