"""Pre-training objectives on real structures: one optimizer step lowers each loss, targets equal a slow
computation from coordinates, masked or removed information does not reach the model; sequence-structure
contrast learns retrieval and gathers across two gloo ranks."""
import math
import os
import random
import socket

import pytest
import torch

from conftest import STRUCTURES
from esm_gearnet import distributed
from esm_gearnet.data import (AlphaCarbonNode, GraphConstruction, KNNEdge, ProteinBatch, SequentialEdge,
                              SpatialEdge, load_structure)
from esm_gearnet.models import ESM, FusionNetwork, GearNet
from esm_gearnet.tasks import (AnglePrediction, DihedralPrediction, DistancePrediction, MultiviewContrast,
                               NoiseTransform, ResidueTypePrediction, SequenceStructureContrast, SiamDiff)
from esm_gearnet.tasks.contrast import clip_loss
from esm_gearnet.layers.functional import dihedral
from esm_gearnet.tasks.pretrain import (RandomEdgeMask, SubspaceNode, SubsequenceNode, mask_residues,
                                        remove_pairs, sample_in_segments)
from esm_gearnet.tasks.siamdiff import perturb

FILES = ["1D66-A.pdb", "1ORC-A.pdb", "2N2U-A.pdb", "6MRR-A.pdb", "1WVN-A.pdb", "3MQI-A.pdb", "1BC8-C.pdb",
         "1U2H-A.pdb", "1LDS-A.pdb", "1HWU-A.pdb", "2ZXJ-A.pdb", "1TTV-A.pdb", "1GN0-A.pdb", "1A7G-E.cif",
         "2EFJ-A.pdb", "1IGY-A.pdb"]


@pytest.fixture(scope="module")
def proteins():
    if not STRUCTURES.exists():
        pytest.skip("../shared/data is absent: these tests read real structures")
    return [load_structure(STRUCTURES / f) for f in FILES]


def _batch(proteins, count=4, length=60):
    return ProteinBatch.pack([p.subresidue(torch.arange(min(length, p.num_residue))) for p in proteins[:count]])


def _graph():
    return GraphConstruction([AlphaCarbonNode()], [SequentialEdge(max_distance=2),
                                                    SpatialEdge(radius=10.0, min_distance=5),
                                                    KNNEdge(k=10, min_distance=5)])


def _encoder(fusion="series", width=16):
    torch.manual_seed(0)
    esm = ESM(model="ESM-2-8M", pretrained=False, architecture=[1, 32, 4])
    gearnet = GearNet(input_dim=32 if fusion == "series" else 21, hidden_dims=[width, width], num_relation=7,
                      batch_norm=True, concat_hidden=True, short_cut=True, readout="sum")
    return FusionNetwork(esm, gearnet, fusion=fusion, graph_construction_model=_graph())


def _loss_after_one_step(task, batch, lr=1e-3):
    """(loss before, loss after) one Adam step, with the objective's random draws repeated exactly."""
    optimizer = torch.optim.Adam([p for p in task.parameters() if p.requires_grad], lr=lr)
    losses = []
    for step in range(2):
        torch.manual_seed(1)
        random.seed(1)
        loss, info = task(batch)
        assert torch.isfinite(loss) and set(info) >= {"loss"}
        losses.append(float(loss.detach()))
        if step == 0:
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return losses


OBJECTIVES = {
    "residue_type": lambda: ResidueTypePrediction(_encoder(), mask_rate=0.15),
    "distance": lambda: DistancePrediction(_encoder(), num_sample=32),
    "angle": lambda: AnglePrediction(_encoder(), num_sample=32),
    "dihedral": lambda: DihedralPrediction(_encoder(), num_sample=32),
    "multiview": lambda: MultiviewContrast(_encoder(), crop_funcs=[SubsequenceNode(30)],
                                           noise_funcs=[RandomEdgeMask(0.15)]),
    "siamdiff": lambda: SiamDiff(_encoder()),
    "contrast": lambda: SequenceStructureContrast(_encoder("parallel"), embedding_dim=16),
}


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_one_step_lowers_the_loss(proteins, name):
    task = OBJECTIVES[name]()
    task.train()
    batch = {"graph": _batch(proteins)}
    if name == "siamdiff":
        torch.manual_seed(2)
        batch = NoiseTransform(sigma=0.3)(batch)
    before, after = _loss_after_one_step(task, batch)
    assert after < before, (before, after)


def test_masked_residues_do_not_reach_the_model(proteins):
    task = ResidueTypePrediction(_encoder(), mask_rate=0.3).eval()
    graph = _batch(proteins)
    torch.manual_seed(3)
    mask = task.sample_mask(graph)
    counts = torch.bincount(graph.residue2graph[mask], minlength=graph.batch_size)
    assert torch.equal(counts, (graph.num_residues * 0.3).long())
    other = graph.replace(residue_type=torch.where(mask, (graph.residue_type + 7) % 20, graph.residue_type),
                          atom_pos=torch.where(mask[:, None, None], graph.atom_pos + 1.0, graph.atom_pos)
                          .index_put_((torch.arange(graph.num_residue), torch.ones(graph.num_residue, dtype=torch.long)),
                                      graph.pos))  # other types and side chains; same CA
    for g in (graph, other):
        seen = mask_residues(g, mask)
        assert (seen.residue_type[mask] == 20).all() and not seen.atom_mask[mask, 4:].any()
    a = task.encoder(mask_residues(graph, mask), mask)["residue_feature"]
    b = task.encoder(mask_residues(other, mask), mask)["residue_feature"]
    assert torch.equal(a, b)
    unmasked = task.encoder(other)["residue_feature"]  # without the mask the change is visible
    assert not torch.allclose(unmasked, a)


def test_removed_edges_are_gone_in_every_relation(proteins):
    graph = _graph()(_batch(proteins)).replace(edge_feature=None)
    for cls, points in ((DistancePrediction, 2), (AnglePrediction, 3), (DihedralPrediction, 4)):
        task = cls(_encoder(), num_sample=64)
        torch.manual_seed(4)
        path = task.sample_paths(graph)
        assert len(path) > 0.5 * 64 * graph.batch_size
        a, b = path[:, :-1].flatten(), path[:, 1:].flatten()
        # perturb: connect every sampled pair again in every relation and both directions
        extra = torch.stack([torch.stack([x, y, torch.full_like(x, r)], -1)
                             for r in range(graph.num_relation) for x, y in ((a, b), (b, a))]).reshape(-1, 3)
        augmented = graph.replace(edge_list=torch.cat([graph.edge_list, extra]))
        seen, seen_augmented = remove_pairs(graph, a, b), remove_pairs(augmented, a, b)
        assert torch.equal(seen.edge_list, seen_augmented.edge_list)
        pairs = {(int(x), int(y)) for x, y in zip(a, b)} | {(int(y), int(x)) for x, y in zip(a, b)}
        assert not any((int(s), int(t)) in pairs for s, t, _ in seen.edge_list.tolist())
        # each consecutive pair of a path was an edge of the graph, and no residue repeats
        edge_set = {(int(s), int(t)) for s, t, _ in graph.edge_list.tolist()}
        assert all((int(x), int(y)) in edge_set for x, y in zip(a, b))
        assert all(len(set(row)) == points for row in path.tolist())


def _slow_angle(p, q, r):
    u = [p[k] - q[k] for k in range(3)]
    v = [r[k] - q[k] for k in range(3)]
    dot = sum(x * y for x, y in zip(u, v))
    return math.acos(max(-1.0, min(1.0, dot / math.sqrt(sum(x * x for x in u)) / math.sqrt(sum(x * x for x in v)))))


def _slow_dihedral(p0, p1, p2, p3):
    """IUPAC signed dihedral by projection onto the plane normal to the middle bond."""
    def sub(x, y):
        return [x[k] - y[k] for k in range(3)]

    def dot(x, y):
        return sum(a * b for a, b in zip(x, y))

    def cross(x, y):
        return [x[1] * y[2] - x[2] * y[1], x[2] * y[0] - x[0] * y[2], x[0] * y[1] - x[1] * y[0]]
    b0, b1, b2 = sub(p0, p1), sub(p2, p1), sub(p3, p2)
    norm = math.sqrt(dot(b1, b1))
    b1 = [c / norm for c in b1]
    v = [b0[k] - dot(b0, b1) * b1[k] for k in range(3)]
    w = [b2[k] - dot(b2, b1) * b1[k] for k in range(3)]
    return math.atan2(dot(cross(b1, v), w), dot(v, w))


def test_geometry_targets_equal_a_slow_computation(proteins):
    graph = _graph()(_batch(proteins))
    pos = graph.pos.double()
    torch.manual_seed(5)
    distance = DistancePrediction(_encoder(), num_sample=16)
    angle = AnglePrediction(_encoder(), num_sample=64, num_class=8)
    unsigned = DihedralPrediction(_encoder(), num_sample=64, num_class=8)
    signed = DihedralPrediction(_encoder(), num_sample=64, num_class=8, signed=True)
    path3, path4 = angle.sample_paths(graph), unsigned.sample_paths(graph)
    got = angle.target(pos, path3)
    for row, value in zip(path3.tolist(), got.tolist()):
        expected = _slow_angle(*(pos[k].tolist() for k in row))
        assert value == min(int(expected / math.pi * 8), 7)
    for row, u, s in zip(path4.tolist(), unsigned.target(pos, path4).tolist(), signed.target(pos, path4).tolist()):
        expected = _slow_dihedral(*(pos[k].tolist() for k in row))
        assert u == min(int(abs(expected) / math.pi * 8), 7)
        assert s == min(int((expected + math.pi) / (2 * math.pi) * 8), 7)
        assert dihedral(*(pos[k:k + 1] for k in row), signed=True).item() == pytest.approx(expected, abs=1e-9)
    pairs = distance.sample_paths(graph)
    assert len(pairs) == 16 * graph.batch_size
    for (i, j), value in zip(pairs.tolist(), distance.target(pos, pairs).tolist()):
        assert value == pytest.approx(math.dist(pos[i].tolist(), pos[j].tolist()), abs=1e-12)


def test_crops_and_noises(proteins):
    graph = _batch(proteins, count=4, length=80)
    torch.manual_seed(7)
    crop = SubsequenceNode(max_length=30)(graph)
    assert torch.equal(crop.num_residues, graph.num_residues.clamp(max=30))
    for b in range(graph.batch_size):  # each crop is a contiguous window of its protein
        numbers = crop.residue_number[crop.residue2graph == b]
        assert torch.equal(numbers, torch.arange(int(numbers[0]), int(numbers[0]) + len(numbers)))
    space = SubspaceNode(min_neighbor=15, min_radius=8.0)(graph)
    assert (space.num_residues >= 15).all() and (space.num_residues <= graph.num_residues).all()
    built = _graph()(graph)
    masked = RandomEdgeMask(mask_rate=0.25)(built)
    assert torch.equal(built.num_edges - masked.num_edges, (built.num_edges * 0.25).long())
    segment = torch.tensor([0, 0, 0, 1, 1, 2])
    chosen = sample_in_segments(segment, torch.tensor([2, 1, 0]))
    assert chosen[:3].sum() == 2 and chosen[3:5].sum() == 1 and not chosen[5]


def test_siamdiff_perturbation_and_masking(proteins):
    graph = _batch(proteins)
    task = SiamDiff(_encoder()).eval()
    scale = torch.tensor([0.0, 0.5, 1.0, 2.0])
    noise = torch.randn(graph.num_residue, 3)
    moved = perturb(graph, scale, noise)
    shift = (moved.atom_pos - graph.atom_pos)[graph.atom_mask]
    expected = (noise * scale[graph.residue2graph, None]).unsqueeze(1).expand(-1, 14, -1)[graph.atom_mask]
    torch.testing.assert_close(shift, expected)
    assert task.noise_scale[0] < task.noise_scale[-1] and len(task.noise_scale) == 100
    torch.manual_seed(8)
    t, mask = task.sample(graph)
    counts = torch.bincount(graph.residue2graph[mask], minlength=4)
    assert torch.equal(counts, (graph.num_residues * (t + 1) / 100).long().clamp(min=1))
    other = graph.replace(residue_type=torch.where(mask, (graph.residue_type + 3) % 20, graph.residue_type))
    a = task.encoder(mask_residues(graph, mask), mask)["residue_feature"]
    b = task.encoder(mask_residues(other, mask), mask)["residue_feature"]
    assert torch.equal(a, b)
    pair = NoiseTransform(sigma=0.3)({"graph": graph})
    delta = (pair["graph2"].atom_pos - graph.atom_pos)[graph.atom_mask]
    assert 0.2 < float(delta.std()) < 0.4 and torch.equal(pair["graph2"].residue_type, graph.residue_type)


@pytest.mark.slow
def test_sequence_structure_contrast_learns_retrieval(proteins):
    torch.manual_seed(0)
    task = SequenceStructureContrast(_encoder("parallel", width=32), embedding_dim=32)
    batch = {"graph": _batch(proteins, count=16, length=50)}
    optimizer = torch.optim.Adam(task.parameters(), lr=3e-3)

    def retrieval():
        task.eval()
        with torch.no_grad():
            _, info = task(batch)
        task.train()
        return info

    def retrieves(info):
        return info["sequence_to_structure_accuracy"] >= 0.5 and info["structure_to_sequence_accuracy"] >= 0.5

    assert not retrieves(retrieval())  # chance is 1 in 16
    for step in range(1, 151):  # it learns within about 20 steps; checked every 10, up to 150
        loss, info = task(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 0 and retrieves(info := retrieval()):
            break
    assert retrieves(info), info
    assert info["logit_scale"] != pytest.approx(1 / 0.07)  # the temperature is learned
    with pytest.raises(ValueError, match="fusion: parallel"):
        SequenceStructureContrast(_encoder("series"))


def _gather_worker(rank, port, sequence, structure, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    rows = slice(4 * rank, 4 * rank + 4)
    s = sequence[rows].clone().requires_grad_(True)
    t = structure[rows].clone().requires_grad_(True)
    loss, acc_s, acc_t = clip_loss(s, t, torch.tensor(5.0))
    loss.backward()
    uneven = slice(0, 3) if rank == 0 else slice(3, 8)  # ranks may hold different numbers of proteins
    uneven_loss, _, _ = clip_loss(sequence[uneven], structure[uneven], torch.tensor(5.0))
    torch.save({"loss": loss.detach(), "grad_s": s.grad, "grad_t": t.grad, "acc": (acc_s, acc_t),
                "uneven": uneven_loss}, f"{out}/{rank}.pt")
    distributed.shutdown()  # together: a rank that leaves while its peer still talks makes gloo abort the peer


@pytest.mark.slow
def test_contrast_gathers_negatives_across_two_gloo_ranks(tmp_path):
    torch.manual_seed(0)
    sequence = torch.nn.functional.normalize(torch.randn(8, 6), dim=-1)
    structure = torch.nn.functional.normalize(sequence + 0.8 * torch.randn(8, 6), dim=-1)
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        port = handle.getsockname()[1]
    torch.multiprocessing.spawn(_gather_worker, args=(port, sequence, structure, str(tmp_path)), nprocs=2)
    parts = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    s, t = sequence.clone().requires_grad_(True), structure.clone().requires_grad_(True)
    loss, acc_s, acc_t = clip_loss(s, t, torch.tensor(5.0))  # one process, the whole batch of 8
    loss.backward()
    # the mean of the ranks' losses (what DDP optimises) is the global loss over 8 x 8 pairs
    assert float(parts[0]["loss"] + parts[1]["loss"]) / 2 == pytest.approx(float(loss.detach()), abs=1e-6)
    assert (3 * parts[0]["uneven"] + 5 * parts[1]["uneven"]) / 8 == pytest.approx(float(loss.detach()), abs=1e-6)
    # each rank receives the gradient of every rank's loss for its rows; DDP's average is the global gradient
    grad_s = torch.cat([parts[0]["grad_s"], parts[1]["grad_s"]]) / 2
    grad_t = torch.cat([parts[0]["grad_t"], parts[1]["grad_t"]]) / 2
    torch.testing.assert_close(grad_s, s.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad_t, t.grad, atol=1e-6, rtol=1e-5)
    accuracy = (float(parts[0]["acc"][0]) + float(parts[1]["acc"][0])) / 2
    assert accuracy == pytest.approx(float(acc_s))


def test_clip_loss_equals_infonce_written_as_loops():
    """One process: the symmetric InfoNCE of CLIP, each term written out over the pairs (no matrix product)."""
    import math

    torch.manual_seed(3)
    sequence = torch.nn.functional.normalize(torch.randn(5, 4), dim=-1)
    structure = torch.nn.functional.normalize(sequence + torch.randn(5, 4), dim=-1)
    scale = 7.0
    loss, seq_accuracy, struct_accuracy = clip_loss(sequence, structure, torch.tensor(scale))

    def term(a, b):  # mean over i of -log( exp(scale a_i.b_i) / sum_j exp(scale a_i.b_j) ), and top-1 accuracy
        total, hits = 0.0, 0
        for i in range(len(a)):
            scores = [scale * sum(float(x) * float(y) for x, y in zip(a[i], b[j])) for j in range(len(b))]
            total -= scores[i] - math.log(sum(math.exp(s) for s in scores))
            hits += max(range(len(scores)), key=scores.__getitem__) == i
        return total / len(a), hits / len(a)

    (forward, forward_hits), (backward, backward_hits) = term(sequence, structure), term(structure, sequence)
    assert float(loss) == pytest.approx((forward + backward) / 2, rel=1e-5)
    assert float(seq_accuracy) == pytest.approx(forward_hits) and float(struct_accuracy) == pytest.approx(backward_hits)
