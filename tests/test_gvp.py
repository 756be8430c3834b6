"""GVP-GNN: the original's state_dict layout, a reference written from the equations (one GVP, one message-passing
layer, the whole network), invariant scalars, equivariant vectors, packing, gradients, fusion with ESM."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from esm_gearnet import checkpoint
from esm_gearnet.data import AlphaCarbonNode, GraphConstruction, ProteinBatch, SpatialEdge
from esm_gearnet.models import ESM, GVPGNN, FusionNetwork, residue_one_hot
from esm_gearnet.models.gvp import GVP, GVPConvLayer, rbf
from conftest import assert_every_parameter_trained, assert_packed_equals_single
from original_layouts import (TINY_GVPGNN, TINY_GVPGNN_CONFIG, original_gvp_conv_layer_layout, original_gvp_layout,
                              original_gvpgnn_layout, random_state, shapes_of)
from test_graph import _random_rigid_motion

GVP_GRAPH = GraphConstruction([AlphaCarbonNode()], [SpatialEdge(radius=10.0, min_distance=0)])


def _gvp(input_dim=21, drop_rate=0.1):
    torch.manual_seed(0)
    return GVPGNN(node_in_dim=[input_dim, 0], node_h_dim=[32, 4], edge_in_dim=[16, 1], edge_h_dim=[16, 1],
                  num_layers=2, vector_gate=True, readout="mean", drop_rate=drop_rate)


def test_rbf_features():
    values = rbf(torch.tensor([0.0, 20.0, 10.0]), 16)
    assert values.shape == (3, 16)
    assert values[0, 0] == 1 and values[1, -1] == 1  # centres at 0 and 20 A
    assert int(values[2].argmax()) in (7, 8)


def test_scalars_are_invariant_and_vectors_rotate(all_proteins):
    model = _gvp().eval()
    proteins = all_proteins[:3]
    batch = GVP_GRAPH(ProteinBatch.pack(proteins))
    rotation, shift = _random_rigid_motion(3)
    moved_pos = (batch.atom_pos.double() @ rotation.T + shift).float() * batch.atom_mask.unsqueeze(-1)
    moved = batch.replace(atom_pos=moved_pos)
    with torch.no_grad():
        a = model.network(batch, residue_one_hot(batch))
        b = model.network(moved, residue_one_hot(moved))
    torch.testing.assert_close(b["residue_feature"], a["residue_feature"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b["graph_feature"], a["graph_feature"], atol=1e-4, rtol=1e-4)
    rotated = a["vector_feature"].double() @ rotation.T
    torch.testing.assert_close(b["vector_feature"].double(), rotated, atol=1e-4, rtol=1e-4)
    assert a["vector_feature"].abs().sum() > 0


def test_packed_equals_one_at_a_time(all_proteins, device):
    model = _gvp().eval().to(device)
    proteins = all_proteins[3:6]

    def run(group):
        batch = GVP_GRAPH(ProteinBatch.pack(group).to(device))
        return model.network(batch, residue_one_hot(batch))

    with torch.no_grad():
        assert_packed_equals_single(run, proteins)


@pytest.mark.parametrize("fusion", ["series", "parallel", "cross"])
def test_esm_gvp_fusion_trains_every_parameter(all_proteins, fusion):
    torch.manual_seed(0)
    esm = ESM(pretrained=False, architecture=(1, 32, 4))
    gvp = _gvp(32 if fusion == "series" else 21, drop_rate=0.0)
    net = FusionNetwork(esm, gvp, fusion=fusion, cross_dim=16)
    batch = GVP_GRAPH(ProteinBatch.pack(all_proteins[:2]))
    out = net(batch)
    assert out["graph_feature"].shape == (2, net.output_dim)
    out["graph_feature"].pow(2).mean().backward()
    assert_every_parameter_trained(net)


def test_the_ec_config_trains_under_bf16_autocast():
    """config/EC/esm_gvp.yaml, made small: ESM's features (fp32 out of its last layer norm) feed the GVP layers,
    whose messages come out of linear layers in bf16 and were summed into fp32 features by index_add_ (a dtype
    error in the second layer)."""
    from conftest import small
    from esm_gearnet.assembly import build_task, model_config
    from esm_gearnet.config import load_config
    from esm_gearnet.data import collate
    from esm_gearnet.registry import build

    root = Path(__file__).resolve().parents[1] / "config"
    cfg = load_config(str(root / "EC" / "esm_gvp.yaml"), {})
    cfg.dataset = load_config(str(root / "demo" / "esm_gearnet.yaml"), {"num_protein": 8}).dataset
    small(model_config(cfg)[0])
    dataset = build(cfg.dataset, "dataset")
    torch.manual_seed(0)
    task = build_task(cfg, list(range(len(dataset.tasks))))
    batch = collate([dataset[i] for i in range(2)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = task(batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in task.encoder.structure_model.parameters())


# ---- the original's state_dict layout (tests/original_layouts.py, written from the original's code) -------------

# config/{EC,GO,PSR,MSP}/*gvp*.yaml of the original: [1280, 0] after ESM-2-650M (series), [21, 0] otherwise
ORIGINAL_GVP = dict(node_h_dim=[256, 16], edge_in_dim=[16, 1], edge_h_dim=[64, 1], num_layers=5, vector_gate=True)


def _load_original(module, state, source="the original's state_dict"):
    """What --ckpt does with a bare state_dict of the original: `encoder_state`, then the strict, checked load."""
    checkpoint.load_state_dict_checked(module, checkpoint.encoder_state(dict(state), source), source)


def test_layout_function_writes_the_literal_table():
    assert original_gvpgnn_layout(**TINY_GVPGNN_CONFIG) == TINY_GVPGNN


@pytest.mark.parametrize("input_dim", [1280, 21])
def test_loader_takes_the_original_layout_of_the_original_configs(input_dim):
    layout = original_gvpgnn_layout(node_in_dim=[input_dim, 0], **ORIGINAL_GVP)
    # residue_embdding 1, W_v 4, W_e 8, per layer 3 x 6 message + 4 norm + 2 probes + 2 x 6 feed-forward, W_out 5
    assert len(layout) == 1 + 4 + 8 + 5 * 36 + 5
    assert layout["layers.4.conv.message_func.0.ws.weight"] == (256, 33 + 2 * 256 + 64)  # h = max(2*16 + 1, 16)
    with checkpoint.skipping_init():
        model = GVPGNN(node_in_dim=[input_dim, 0], readout="mean", drop_rate=0.1, **ORIGINAL_GVP)
    _load_original(model, {name: torch.zeros(shape) for name, shape in layout.items()})
    # every key of the original but the empty dropout probes, each with the original's shape
    assert shapes_of(model.state_dict()) == {k: v for k, v in layout.items() if not k.endswith("dummy_param")}


def _refusal(missing="none", unexpected="none", misshaped="none"):
    return (f"the original's state_dict does not fit GVPGNN: missing keys: {missing}; unexpected keys: {unexpected}; "
            f"mis-shaped keys (checkpoint vs model): {misshaped}. Check that the config builds the model the "
            "checkpoint was saved from.")


def test_loader_refuses_a_missing_extra_or_misshaped_key():
    model = GVPGNN(readout="mean", **TINY_GVPGNN_CONFIG)
    state = {name: torch.zeros(shape) for name, shape in TINY_GVPGNN.items()}
    _load_original(model, state)
    cases = [({k: v for k, v in state.items() if k != "W_e.1.wsv.bias"}, _refusal(missing="W_e.1.wsv.bias")),
             ({**state, "W_out.1.wv.weight": torch.zeros(4, 2)}, _refusal(unexpected="W_out.1.wv.weight")),
             ({**state, "W_v.1.ws.weight": torch.zeros(3, 4)}, _refusal(misshaped="W_v.1.ws.weight (3, 4) vs (4, 3)")),
             ({**state, "layers.0.dropout.1.vdropout.dummy_param": torch.zeros(1)},  # only empty probes are dropped
              _refusal(unexpected="layers.0.dropout.1.vdropout.dummy_param"))]
    for broken, sentence in cases:
        with pytest.raises(checkpoint.CheckpointError) as error:
            _load_original(model, broken)
        assert str(error.value) == sentence


# ---- a reference written from the equations (Jing et al. 2021, with the original's conventions), one sample at a
# time, reading the weights by the original's names --------------------------------------------------------------

def _vector_norm(v):
    """|v| of one 3-vector, clamped below at sqrt(1e-8) (gvp-pytorch's _norm_no_nan)."""
    return torch.sqrt(torch.clamp((v * v).sum(), min=1e-8))


def _ref_gvp(p, prefix, out_dims, s, V, activations, vector_gate):
    """One GVP on one sample: s [si] scalars, V [vi, 3] vectors (vi may be 0) -> (s' [so], V' [vo, 3] or None).

    V_h = W_h V, s_h = |V_h| row by row, s_m = W_s [s, s_h] + b_s (the original puts the scalars first),
    V_mu = W_mu V_h; gated: V' = sigmoid(W_sv σ+(s_m) + b_sv) ⊙ V_mu (σ+ the vector activation, if any), else
    V' = σ+(|V_mu|) ⊙ V_mu; s' = σ(s_m). Without vector input, s_m = W_s s + b_s and V' = 0.
    """
    scalar_act, vector_act = activations
    so, vo = out_dims
    if prefix + "wh.weight" not in p:
        s_m = p[prefix + "ws.weight"] @ s + p[prefix + "ws.bias"]
        V_out = torch.zeros(vo, 3, dtype=s.dtype) if vo else None
    else:
        W_h = p[prefix + "wh.weight"]  # [h, vi]
        h, vi = W_h.shape
        V_h = [sum(W_h[k, c] * V[c] for c in range(vi)) for k in range(h)]
        s_h = torch.stack([_vector_norm(v) for v in V_h])
        s_m = p[prefix + "ws.weight"] @ torch.cat([s, s_h]) + p[prefix + "ws.bias"]
        V_out = None
        if vo:
            W_mu = p[prefix + "wv.weight"]  # [vo, h]
            V_mu = [sum(W_mu[m, k] * V_h[k] for k in range(h)) for m in range(vo)]
            if vector_gate:
                gate_input = vector_act(s_m) if vector_act else s_m
                gate = p[prefix + "wsv.weight"] @ gate_input + p[prefix + "wsv.bias"]
                V_out = torch.stack([torch.sigmoid(gate[m]) * V_mu[m] for m in range(vo)])
            elif vector_act:
                V_out = torch.stack([vector_act(_vector_norm(v)) * v for v in V_mu])
            else:
                V_out = torch.stack(V_mu)
    return (scalar_act(s_m) if scalar_act else s_m), V_out


def _ref_norm(p, prefix, s, V):
    """GVPLayerNorm on one sample: LayerNorm of s (biased variance, eps 1e-5); V divided by the root mean square
    of its channels' (clamped) norms."""
    mean = s.mean()
    variance = ((s - mean) ** 2).mean()
    s = (s - mean) / torch.sqrt(variance + 1e-5) * p[prefix + "scalar_norm.weight"] + p[prefix + "scalar_norm.bias"]
    if V is None or not len(V):
        return s, V
    rms = torch.sqrt(sum(_vector_norm(v) ** 2 for v in V) / len(V))
    return s, V / rms


RELU = (F.relu, None)  # what the original's GVPGNN gives every layer
LINEAR = (None, None)


def _ref_conv_layer(p, prefix, node_dims, nodes, edges, edge_features):
    """One GVPConvLayer in eval mode (no dropout): for each node i, the mean over its incoming edges j -> i of the
    message GVP^3([s_j, s_e, s_i], [V_j, V_e, V_i]) (0 without incoming edges); x = norm_0(x + dh); then the
    feed-forward GVP^2 (hidden (4 si, 2 vi)), x = norm_1(x + ff(x)).

    nodes: list of (s [si], V [vi, 3]); edges: list of (source, target); edge_features: list of (s_e, V_e)."""
    si, vi = node_dims
    hidden = (4 * si, 2 * vi)
    updated = []
    for i, (s_i, V_i) in enumerate(nodes):
        messages = []
        for (j, target), (s_e, V_e) in zip(edges, edge_features):
            if target != i:
                continue
            s_j, V_j = nodes[j]
            s, V = torch.cat([s_j, s_e, s_i]), torch.cat([V_j, V_e, V_i])
            s, V = _ref_gvp(p, prefix + "conv.message_func.0.", node_dims, s, V, RELU, True)
            s, V = _ref_gvp(p, prefix + "conv.message_func.1.", node_dims, s, V, RELU, True)
            s, V = _ref_gvp(p, prefix + "conv.message_func.2.", node_dims, s, V, LINEAR, True)
            messages.append((s, V))
        if messages:
            dh_s, dh_V = sum(m[0] for m in messages) / len(messages), sum(m[1] for m in messages) / len(messages)
        else:
            dh_s, dh_V = torch.zeros_like(s_i), torch.zeros_like(V_i)
        s, V = _ref_norm(p, prefix + "norm.0.", s_i + dh_s, V_i + dh_V)
        f_s, f_V = _ref_gvp(p, prefix + "ff_func.0.", hidden, s, V, RELU, True)
        f_s, f_V = _ref_gvp(p, prefix + "ff_func.1.", node_dims, f_s, f_V, LINEAR, True)
        updated.append(_ref_norm(p, prefix + "norm.1.", s + f_s, V + f_V))
    return updated


def _ref_gvpgnn(p, config, pos, edges, x, num_residues):
    """The original GVPGNN.forward in eval mode: residue_embdding, W_v, edge features (RBFs of |pos_t - pos_s| over
    0-20 Å with width 20/num_rbf, and the displacement pos_t - pos_s), W_e, the layers, W_out, mean readout."""
    node_h, edge_h, num_rbf = config["node_h_dim"], config["edge_h_dim"], config["edge_in_dim"][0]
    nodes = []
    for row in x:
        s = p["residue_embdding.weight"] @ row
        s, _ = _ref_norm(p, "W_v.0.", s, None)
        nodes.append(_ref_gvp(p, "W_v.1.", node_h, s, None, LINEAR, True))
    edge_features = []
    for source, target in edges:
        displacement = pos[target] - pos[source]
        distance = displacement.norm()
        centres = [20.0 * k / (num_rbf - 1) for k in range(num_rbf)]
        s = torch.stack([torch.exp(-((distance - mu) / (20.0 / num_rbf)) ** 2) for mu in centres])
        s, V = _ref_norm(p, "W_e.0.", s, displacement.view(1, 3))
        edge_features.append(_ref_gvp(p, "W_e.1.", edge_h, s, V, LINEAR, True))
    for i in range(config["num_layers"]):
        nodes = _ref_conv_layer(p, f"layers.{i}.", node_h, nodes, edges, edge_features)
    out = []
    for s, V in nodes:
        s, V = _ref_norm(p, "W_out.0.", s, V)
        out.append(_ref_gvp(p, "W_out.1.", (node_h[0], 0), s, V, RELU, True)[0])
    out = torch.stack(out)
    graph = torch.stack([rows.mean(0) for rows in out.split(num_residues)])
    return out, graph, torch.stack([V for _, V in nodes])


@pytest.mark.parametrize("in_dims, out_dims, activations, vector_gate", [
    ((6, 3), (5, 4), RELU, True),  # the original's GVPGNN layers
    ((6, 4), (5, 4), (torch.relu, torch.sigmoid), True),  # gate on σ+(s_m); W_h square
    ((6, 3), (5, 2), (torch.relu, torch.sigmoid), False),  # V' = σ+(|V_mu|) V_mu
    ((6, 0), (5, 2), LINEAR, True),  # no vector input (W_v): ws alone, vectors start at zero
    ((6, 3), (5, 0), RELU, True),  # no vector output (W_out)
], ids=["gated", "gated-sigmoid", "ungated", "no-vector-in", "no-vector-out"])
def test_one_gvp_matches_the_equations(in_dims, out_dims, activations, vector_gate):
    layout = original_gvp_layout(in_dims, out_dims, vector_gate)
    state = random_state(layout, seed=sum(in_dims) + sum(out_dims))
    gvp = GVP(in_dims, out_dims, activations=activations, vector_gate=vector_gate).double()
    _load_original(gvp, state)
    generator = torch.Generator().manual_seed(1)
    s = torch.randn(4, in_dims[0], generator=generator, dtype=torch.float64)
    V = torch.randn(4, in_dims[1], 3, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        out = gvp((s, V) if in_dims[1] else s)
    out_s, out_V = out if out_dims[1] else (out, None)
    for m in range(4):
        ref_s, ref_V = _ref_gvp(state, "", out_dims, s[m], V[m], activations, vector_gate)
        torch.testing.assert_close(out_s[m], ref_s, atol=1e-10, rtol=1e-10)
        if out_dims[1]:
            torch.testing.assert_close(out_V[m], ref_V, atol=1e-10, rtol=1e-10)
    if out_dims[1] and in_dims[1]:
        assert out_V.abs().sum() > 0


def test_one_message_passing_layer_matches_the_equations():
    """A hand-made graph of 5 nodes: node 3 receives three messages, node 4 none; an edge in each direction
    between 0 and 1 (source and target must not be confused)."""
    node_dims, edge_dims = (4, 2), (3, 1)
    state = random_state(original_gvp_conv_layer_layout(node_dims, edge_dims, True), seed=3)
    layer = GVPConvLayer(node_dims, edge_dims, drop_rate=0.1, activations=RELU, vector_gate=True).double().eval()
    _load_original(layer, state)
    generator = torch.Generator().manual_seed(2)
    edges = [(0, 1), (1, 0), (2, 3), (0, 3), (1, 3), (3, 2), (4, 2)]
    s = torch.randn(5, 4, generator=generator, dtype=torch.float64)
    V = torch.randn(5, 2, 3, generator=generator, dtype=torch.float64)
    s_e = torch.randn(len(edges), 3, generator=generator, dtype=torch.float64)
    V_e = torch.randn(len(edges), 1, 3, generator=generator, dtype=torch.float64)
    edge_list = torch.tensor([[a, b, 0] for a, b in edges])
    with torch.no_grad():
        out_s, out_V = layer((s, V), edge_list, (s_e, V_e))
    reference = _ref_conv_layer(state, "", node_dims, list(zip(s, V)), edges, list(zip(s_e, V_e)))
    torch.testing.assert_close(out_s, torch.stack([r[0] for r in reference]), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(out_V, torch.stack([r[1] for r in reference]), atol=1e-10, rtol=1e-10)


def test_whole_network_matches_the_equations(all_proteins):
    """The tiny layout's GVPGNN (two layers) over two real pieces of 9 and 6 residues and their radius graph."""
    config = {**TINY_GVPGNN_CONFIG, "node_in_dim": [21, 0], "num_layers": 2}
    state = random_state(original_gvpgnn_layout(**config), seed=4)
    model = GVPGNN(readout="mean", drop_rate=0.1, **config).double().eval()
    _load_original(model, state)
    proteins = [all_proteins[0].subresidue(torch.arange(20, 29)), all_proteins[1].subresidue(torch.arange(6))]
    batch = GVP_GRAPH(ProteinBatch.pack(proteins))
    batch = batch.replace(atom_pos=batch.atom_pos.double())
    x = residue_one_hot(batch).double()
    with torch.no_grad():
        out = model.network(batch, x)
    edges = [(int(a), int(b)) for a, b, _ in batch.edge_list]
    assert len(edges) > 30
    residue, graph, vectors = _ref_gvpgnn(state, config, batch.pos, edges, x, [9, 6])
    torch.testing.assert_close(out["residue_feature"], residue, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(out["graph_feature"], graph, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(out["vector_feature"], vectors, atol=1e-10, rtol=1e-10)


def test_original_configuration_is_checked():
    with pytest.raises(ValueError, match=r"node_in_dim must be \[D, 0\]"):
        GVPGNN(node_in_dim=[21, 3], node_h_dim=[8, 2], edge_in_dim=[16, 1], edge_h_dim=[8, 1])
