"""CDConv against a slow per-edge reference of the original's formulas; invariance, packing, fusion."""
import pytest
import torch
import torch.nn.functional as F

from esm_gearnet.data import Orientation, ProteinBatch, ResidueGraph, graph
from esm_gearnet.data.synthetic import backbone_protein
from esm_gearnet.models import CDConv, ESM, FusionNetwork, residue_one_hot
from esm_gearnet.models.cdconv import local_frames, pool_pairs
from conftest import assert_every_parameter_trained, assert_packed_equals_single
from test_graph import _random_rigid_motion

TINY = dict(embedding_dim=4, hidden_dims=[8, 16, 24], cutoffs=[6.0, 9.0, 12.0], seq_cutoff=5, kernel_dims=[4, 3],
            base_width=32.0, dropout=0.0)


def _tiny(input_dim=21, **options):
    torch.manual_seed(0)
    return CDConv(input_dim, **{**TINY, **options})


def _randomise_batch_norms(model):
    """Eval-mode batch norms with non-trivial statistics, so the reference also checks where they sit."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm1d):
            size = module.num_features
            module.running_mean.copy_(torch.randn(size, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(size, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(size, generator=generator) * 0.1)


# ---- a slow, obvious reference: one protein, python loops, the original's formulas --------------------------

def _reference_frames(pos):
    length = len(pos)
    if length < 3:
        return [torch.eye(3, dtype=pos.dtype)] * length
    u = [F.normalize(pos[i + 1] - pos[i], dim=0) for i in range(length - 1)]
    frames = []
    for i in range(1, length - 1):
        u2, u1 = u[i - 1], u[i]
        b = F.normalize(u2 - u1, dim=0)
        n = F.normalize(torch.linalg.cross(u2, u1), dim=0)
        o = F.normalize(torch.linalg.cross(b, n), dim=0)
        frames.append(torch.stack([b, n, o]))
    return [frames[0]] + frames + [frames[-1]]


def _reference_conv(conv, pos, frames, number, x, cutoff, seq_cutoff):
    half = seq_cutoff // 2
    rows = []
    for i in range(len(pos)):
        total = 0
        for j in range(len(pos)):
            distance = (pos[j] - pos[i]).norm()
            if distance >= cutoff:
                continue
            direction = frames[i] @ ((pos[j] - pos[i]) / (distance + 1e-9))
            alignment = (frames[i] * frames[j]).sum(-1)
            q = int(max(-half, min(half, number[j] - number[i])))
            h = torch.cat([direction, alignment, distance.view(1)])
            for W, b in zip(conv.WeightNet.Ws, conv.WeightNet.bs):
                h = F.leaky_relu(h @ W[q + half] + b[q + half], 0.2)
            smooth = 0.5 - torch.tanh(distance / cutoff * abs(q) / half * 16.0 - 14.0) * 0.5
            total = total + torch.outer(h * smooth, x[j]).flatten()
        rows.append(total)
    return torch.stack(rows) @ conv.W


def _reference_forward(model, pos, number, x):
    x = model.embedding(x)
    frames = _reference_frames(pos)
    number = [int(n) for n in number]
    stages = len(model.layers) // 2
    for stage in range(stages):
        for block in model.layers[2 * stage: 2 * stage + 2]:
            update = _reference_conv(block.conv, pos, frames, number, block.input(x), model.cutoffs[stage],
                                     model.seq_cutoff)
            x = block.output(update) + block.identity(x)
        if stage < stages - 1:
            pairs = [list(range(k, min(k + 2, len(pos)))) for k in range(0, len(pos), 2)]
            x = torch.stack([x[p].mean(0) for p in pairs])
            pos = torch.stack([pos[p].mean(0) for p in pairs])
            frames = [F.normalize(torch.stack([frames[i] for i in p]).mean(0), dim=-1) for p in pairs]
            number = [number[p[0]] // 2 for p in pairs]
    return x, x.mean(0)


def test_matches_slow_reference_of_the_original(all_proteins):
    """A 31-residue piece of a real protein and a 5-residue one (where the original's torch.cross erred)."""
    model = _tiny().double().eval()
    _randomise_batch_norms(model)
    proteins = [all_proteins[0].subresidue(torch.arange(10, 41)), all_proteins[1].subresidue(torch.arange(5))]
    batch = ProteinBatch.pack(proteins)
    batch = batch.replace(atom_pos=batch.atom_pos.double())
    pos = batch.pos
    features = residue_one_hot(batch).double()
    with torch.no_grad():
        out = model.network(batch, features)
        start = 0
        for b, protein in enumerate(proteins):
            rows = slice(start, start + protein.num_residue)
            nodes, graph_feature = _reference_forward(model, pos[rows], batch.residue_number[rows], features[rows])
            torch.testing.assert_close(out["graph_feature"][b], graph_feature, atol=1e-9, rtol=1e-9)
            upsampled = nodes[torch.arange(protein.num_residue) // 4]  # 3 stages: 4 residues per final node
            torch.testing.assert_close(out["residue_feature"][rows], upsampled, atol=1e-9, rtol=1e-9)
            start += protein.num_residue
    assert out["residue_feature"][:31].std(0).abs().sum() > 0  # real per-residue features vary


def test_original_broadcast_option():
    batch = ProteinBatch.pack([backbone_protein("ACDEFGHIKLMNPQ", "HHHHHHHLLEEEEE"), backbone_protein("GGSW", "LLLL")])
    model = _tiny(residue_feature="graph").eval()
    with torch.no_grad():
        out = model.network(batch, residue_one_hot(batch))
    torch.testing.assert_close(out["residue_feature"], out["graph_feature"][batch.residue2graph])
    with pytest.raises(ValueError, match="residue_feature must be 'upsample' or 'graph'"):
        _tiny(residue_feature="nearest")


def test_local_frames_are_rotations_and_short_proteins_get_identity(all_proteins):
    batch = ProteinBatch.pack([all_proteins[2], all_proteins[0].subresidue(torch.arange(2))])
    frames = local_frames(batch.pos.double(), batch.num_residues)
    long = frames[: all_proteins[2].num_residue]
    eye = torch.eye(3, dtype=torch.float64).expand_as(long)
    torch.testing.assert_close(long @ long.transpose(1, 2), eye, atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.det(long), torch.ones(len(long), dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(frames[0], frames[1])  # the first residue borrows its neighbour's frame
    torch.testing.assert_close(frames[-2:], torch.eye(3, dtype=torch.float64).expand(2, 3, 3))


def test_pooling_map():
    old2new, new_counts, first = pool_pairs(torch.tensor([5, 2, 1]))
    assert old2new.tolist() == [0, 0, 1, 1, 2, 3, 3, 4]
    assert new_counts.tolist() == [3, 1, 1]
    assert first.tolist() == [True, False, True, False, True, True, False, True]


@pytest.mark.parametrize("block", [1 << 24, 40])
def test_radius_edges_equal_brute_force(all_proteins, monkeypatch, block):
    monkeypatch.setattr(graph, "_PAIR_BLOCK", block)  # 40: many blocks of targets, order restored
    batch = ProteinBatch.pack(all_proteins[:3])
    edges = graph.radius_edges(batch.pos, batch.num_residues, 8.0)
    expected = []
    for b, start in enumerate(batch.offsets.tolist()):
        pos = batch.pos[start:start + int(batch.num_residues[b])]
        close = torch.cdist(pos.double(), pos.double()) < 8.0
        target, source = close.nonzero(as_tuple=True)
        expected.append(torch.stack([source + start, target + start], -1))
    assert torch.equal(edges, torch.cat(expected))


def test_rotation_and_translation_leave_outputs_unchanged(all_proteins):
    model = _tiny().eval()
    _randomise_batch_norms(model)
    batch = ProteinBatch.pack(all_proteins[:3])
    rotation, shift = _random_rigid_motion(5)
    moved_pos = (batch.atom_pos.double() @ rotation.T + shift).float() * batch.atom_mask.unsqueeze(-1)
    moved = batch.replace(atom_pos=moved_pos)
    with torch.no_grad():
        a = model.network(batch, residue_one_hot(batch))
        b = model.network(moved, residue_one_hot(moved))
    for key in ("residue_feature", "graph_feature"):
        torch.testing.assert_close(b[key], a[key], atol=1e-4, rtol=1e-4)


def test_packed_equals_one_at_a_time(all_proteins, device):
    model = _tiny().eval().to(device)
    proteins = all_proteins[3:6]

    def run(group):
        batch = ProteinBatch.pack(group).to(device)
        return model.network(batch, residue_one_hot(batch))

    with torch.no_grad():
        assert_packed_equals_single(run, proteins)


@pytest.mark.parametrize("fusion", ["series", "parallel", "cross"])
def test_esm_cdconv_fusion_trains_every_parameter(all_proteins, fusion):
    torch.manual_seed(0)
    esm = ESM(pretrained=False, architecture=(1, 32, 4))
    net = FusionNetwork(esm, _tiny(32 if fusion == "series" else 21), fusion=fusion, cross_dim=16)
    batch = ProteinBatch.pack([p.subresidue(torch.arange(min(60, p.num_residue))) for p in all_proteins[:2]])
    out = net(batch)
    assert out["residue_feature"].shape == (batch.num_residue, net.output_dim)
    out["graph_feature"].pow(2).mean().backward()
    assert_every_parameter_trained(net)


def test_original_configuration_and_parameter_names():
    model = CDConv(1280, 16, [256, 512, 1024, 2048], [8.0, 12.0, 16.0, 20.0], 21, [32], base_width=16.0,
                   dropout=0.2)
    assert model.output_dim == 2048 and len(model.layers) == 8
    names = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    assert names["embedding.weight"] == (16, 1280)
    assert names["layers.0.identity.module.3.weight"] == (256, 16)  # BN, LeakyReLU, Dropout, Linear
    assert names["layers.0.input.module.4.running_mean"] == (64,)  # width = 256 * 16 / 64
    assert names["layers.0.conv.WeightNet.Ws.0"] == (21, 7, 32)
    assert names["layers.0.conv.W"] == (32 * 64, 64)
    assert names["layers.7.output.module.3.weight"] == (2048, 512)
    assert "layers.1.identity.module.0.weight" not in names  # same widths: a plain identity


def test_config_transforms_and_missing_alpha_carbon(all_proteins):
    protein = all_proteins[0]
    mask = protein.atom_mask.clone()
    mask[3, 1] = False
    broken = protein.replace(atom_mask=mask)
    model = _tiny().eval()
    batch = ProteinBatch.pack([broken])
    with pytest.raises(ValueError, match="CDConv needs a CA atom in every residue; add the ResidueGraph"):
        model.network(batch, residue_one_hot(batch))
    fixed = Orientation()(ResidueGraph()({"graph": broken}))["graph"]
    assert fixed.num_residue == protein.num_residue - 1
    batch = ProteinBatch.pack([fixed])
    assert model.network(batch, residue_one_hot(batch))["residue_feature"].shape == (fixed.num_residue, 24)
