"""CDConv: the original's state_dict layout, and a slow per-edge reference of the original's formulas reading the
weights by the original's names (one stage on a synthetic chain, the whole network on real pieces); invariance,
packing, fusion."""
import pytest
import torch
import torch.nn.functional as F

from esm_gearnet import checkpoint
from esm_gearnet.data import Orientation, ProteinBatch, ResidueGraph, graph
from esm_gearnet.data.synthetic import backbone_protein
from esm_gearnet.models import CDConv, ESM, FusionNetwork, residue_one_hot
from esm_gearnet.models.cdconv import local_frames, pool_pairs
from conftest import assert_every_parameter_trained, assert_packed_equals_single
from original_layouts import TINY_CDCONV, TINY_CDCONV_CONFIG, original_cdconv_layout, random_state, shapes_of
from test_graph import _random_rigid_motion

TINY = dict(embedding_dim=4, hidden_dims=[8, 16, 24], cutoffs=[6.0, 9.0, 12.0], seq_cutoff=5, kernel_dims=[4, 3],
            base_width=32.0, dropout=0.0)


def _tiny(input_dim=21, **options):
    torch.manual_seed(0)
    return CDConv(input_dim, **{**TINY, **options})


def _randomise_batch_norms(model):
    """Eval-mode batch norms with non-trivial statistics (not the identity a fresh one is)."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm1d):
            size = module.num_features
            module.running_mean.copy_(torch.randn(size, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(size, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(size, generator=generator) * 0.1)


def _original_layout(config):
    """The original's layout for a CDConv config (its `cutoffs` size nothing; dropout owns no parameter)."""
    return original_cdconv_layout(**{k: v for k, v in config.items() if k not in ("cutoffs", "dropout")})


def _load_original(model, state, source="the original's state_dict"):
    """What --ckpt does with a bare state_dict of the original: `encoder_state`, then the strict, checked load."""
    checkpoint.load_state_dict_checked(model, checkpoint.encoder_state(dict(state), source), source)


# ---- a slow, obvious reference: one protein, python loops, the original's formulas and parameter names ------------

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


def _reference_batch_norm(p, name, x):
    """Eval-mode BatchNorm1d, column by column."""
    return (x - p[name + "running_mean"]) / torch.sqrt(p[name + "running_var"] + 1e-5) * p[name + "weight"] \
        + p[name + "bias"]


def _reference_linear(p, prefix, x):
    """cdconv.py's `Linear` (eval): BatchNorm1d, LeakyReLU(0.1), Dropout, nn.Linear without bias."""
    return F.leaky_relu(_reference_batch_norm(p, prefix + "module.0.", x), 0.1) @ p[prefix + "module.3.weight"].T


def _reference_mlp(p, prefix, x):
    """cdconv.py's `MLP` with mid_channels None (eval): `Linear`'s four, then BatchNorm1d, LeakyReLU(0.1)."""
    return F.leaky_relu(_reference_batch_norm(p, prefix + "module.4.", _reference_linear(p, prefix, x)), 0.1)


def _reference_conv(p, prefix, pos, frames, number, x, cutoff, seq_cutoff):
    """cdconv.py's `CDConv` over the radius graph (self-pairs included): for each pair j -> i within `cutoff`,
    g = (frame_i (pos_j - pos_i)/d, rows of frame_i · rows of frame_j, d), q = clamp(n_j - n_i, ±seq_cutoff//2),
    kernel = WeightNet_q(g) (LeakyReLU(0.2) after each Ws[q] g + bs[q]) times the damping s_ij;
    row i = (sum_j vec(kernel ⊗ x_j)) @ W."""
    half = seq_cutoff // 2
    depth = sum(1 for name in p if name.startswith(prefix + "WeightNet.Ws."))
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
            for k in range(depth):
                W, b = p[f"{prefix}WeightNet.Ws.{k}"][q + half], p[f"{prefix}WeightNet.bs.{k}"][q + half]
                h = F.leaky_relu(h @ W + b, 0.2)
            smooth = 0.5 - torch.tanh(distance / cutoff * abs(q) / half * 16.0 - 14.0) * 0.5
            total = total + torch.outer(h * smooth, x[j]).flatten()
        rows.append(total)
    return torch.stack(rows) @ p[prefix + "W"]


def _reference_block(p, prefix, pos, frames, number, x, cutoff, seq_cutoff):
    """cdconv.py's `CDBlock` (eval): output(conv(input(x))) + identity(x), identity a `Linear` when widths differ."""
    identity = _reference_linear(p, prefix + "identity.", x) if prefix + "identity.module.3.weight" in p else x
    h = _reference_mlp(p, prefix + "input.", x)
    h = _reference_conv(p, prefix + "conv.", pos, frames, number, h, cutoff, seq_cutoff)
    return _reference_linear(p, prefix + "output.", h) + identity


def _reference_forward(p, config, pos, number, x):
    """The original network (eval) on one protein: embedding, then per stage two blocks over the stage's radius
    graph and (but after the last) pooling of consecutive pairs. Returns (last stage's nodes, their mean)."""
    x = x @ p["embedding.weight"].T
    frames = _reference_frames(pos)
    number = [int(n) for n in number]
    stages = len(config["hidden_dims"])
    for stage in range(stages):
        for block in (2 * stage, 2 * stage + 1):
            x = _reference_block(p, f"layers.{block}.", pos, frames, number, x, config["cutoffs"][stage],
                                 config["seq_cutoff"])
        if stage < stages - 1:
            pairs = [list(range(k, min(k + 2, len(pos)))) for k in range(0, len(pos), 2)]
            x = torch.stack([x[p].mean(0) for p in pairs])
            pos = torch.stack([pos[p].mean(0) for p in pairs])
            frames = [F.normalize(torch.stack([frames[i] for i in p]).mean(0), dim=-1) for p in pairs]
            number = [number[p[0]] // 2 for p in pairs]
    return x, x.mean(0)


def test_one_stage_matches_slow_reference_of_the_original():
    """The tiny layout (one stage: a widening block with its identity map, then a block without) on a synthetic
    9-residue chain, no pooling."""
    config = TINY_CDCONV_CONFIG
    state = random_state(_original_layout(config), seed=1)
    model = CDConv(**config).double().eval()
    _load_original(model, state)
    batch = ProteinBatch.pack([backbone_protein("ACDEFGHIK", "HHHHLLEEE")])
    batch = batch.replace(atom_pos=batch.atom_pos.double())
    x = torch.randn(9, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        out = model.network(batch, x)
    nodes, graph_feature = _reference_forward(state, config, batch.pos, batch.residue_number, x)
    torch.testing.assert_close(out["residue_feature"], nodes, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(out["graph_feature"][0], graph_feature, atol=1e-10, rtol=1e-10)
    assert nodes.std(0).abs().sum() > 0


def test_matches_slow_reference_of_the_original(all_proteins):
    """Three stages over a 31-residue piece of a real protein and a 5-residue one (where the original's torch.cross
    erred)."""
    config = {"input_dim": 21, **TINY}
    state = random_state(_original_layout(config), seed=0)
    model = _tiny().double().eval()
    _load_original(model, state)
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
            nodes, graph_feature = _reference_forward(state, config, pos[rows], batch.residue_number[rows],
                                                      features[rows])
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


# ---- the original's state_dict layout (tests/original_layouts.py, written from the original's code) -------------

# config/{EC,GO,PSR,MSP}/*cdconv*.yaml of the original: input 1280 after ESM-2-650M (series), 21 otherwise
ORIGINAL_CDCONV = dict(embedding_dim=16, hidden_dims=[256, 512, 1024, 2048], cutoffs=[8.0, 12.0, 16.0, 20.0],
                       seq_cutoff=21, kernel_dims=[32], base_width=16.0, batch_norm=True, dropout=0.2)


def test_layout_function_writes_the_literal_table():
    assert _original_layout(TINY_CDCONV_CONFIG) == TINY_CDCONV


@pytest.mark.parametrize("input_dim", [1280, 21])
def test_loader_takes_the_original_layout_of_the_original_configs(input_dim):
    layout = _original_layout({"input_dim": input_dim, **ORIGINAL_CDCONV})
    # embedding 1; each of the 8 blocks 11 (input: BN, Linear, BN) + 3 (conv: W, Ws.0, bs.0) + 6 (output: BN,
    # Linear); the first block of each stage widens, so 6 more (identity: BN, Linear); a BN holds 5 entries
    assert len(layout) == 1 + 8 * 20 + 4 * 6
    assert layout["layers.6.conv.W"] == (32 * 512, 512) and layout["layers.6.identity.module.3.weight"] == (2048, 1024)
    with checkpoint.skipping_init():
        model = CDConv(input_dim, **ORIGINAL_CDCONV)
    _load_original(model, {name: torch.zeros(shape, dtype=torch.long if not shape else torch.float32)
                           for name, shape in layout.items()})
    assert shapes_of(model.state_dict()) == layout


def test_loader_refuses_a_missing_extra_or_misshaped_key():
    def refusal(missing="none", unexpected="none", misshaped="none"):
        return (f"the original's state_dict does not fit CDConv: missing keys: {missing}; unexpected keys: "
                f"{unexpected}; mis-shaped keys (checkpoint vs model): {misshaped}. Check that the config builds the "
                "model the checkpoint was saved from.")

    model = CDConv(**TINY_CDCONV_CONFIG)
    state = {name: torch.zeros(shape) for name, shape in TINY_CDCONV.items()}
    _load_original(model, state)
    cases = [({k: v for k, v in state.items() if k != "layers.1.conv.WeightNet.bs.1"},
              refusal(missing="layers.1.conv.WeightNet.bs.1")),
             ({**state, "layers.1.identity.module.3.weight": torch.zeros(8, 8)},  # equal widths: no identity map
              refusal(unexpected="layers.1.identity.module.3.weight")),
             ({**state, "layers.0.conv.W": torch.zeros(4, 12)},
              refusal(misshaped="layers.0.conv.W (4, 12) vs (12, 4)"))]
    for broken, sentence in cases:
        with pytest.raises(checkpoint.CheckpointError) as error:
            _load_original(model, broken)
        assert str(error.value) == sentence


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
