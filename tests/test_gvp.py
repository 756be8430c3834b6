"""GVP-GNN: invariant scalars, equivariant vectors, packing, gradients, fusion with ESM."""
import pytest
import torch

from esm_gearnet.data import AlphaCarbonNode, GraphConstruction, ProteinBatch, SpatialEdge
from esm_gearnet.models import ESM, GVPGNN, FusionNetwork, residue_one_hot
from esm_gearnet.models.gvp import rbf
from conftest import assert_every_parameter_trained, assert_packed_equals_single
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


def test_original_configuration_builds():
    model = GVPGNN(node_in_dim=[1280, 0], node_h_dim=[256, 16], edge_in_dim=[16, 1], edge_h_dim=[64, 1],
                   num_layers=5, vector_gate=True, readout="mean", drop_rate=0.1)
    assert model.output_dim == 256 and len(model.layers) == 5
    names = dict(model.named_parameters())
    assert "residue_embdding.weight" in names and "layers.0.conv.message_func.0.wsv.weight" in names
    with pytest.raises(ValueError, match=r"node_in_dim must be \[D, 0\]"):
        GVPGNN(node_in_dim=[21, 3], node_h_dim=[8, 2], edge_in_dim=[16, 1], edge_h_dim=[8, 1])
