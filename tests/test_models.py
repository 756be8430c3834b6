"""ESM, GearNet and FusionNetwork: fidelity to the original, the fast path, invariances, gradients."""
import argparse

import pytest
import torch

from esm_gearnet.data import (AlphaCarbonNode, GraphConstruction, KNNEdge, Protein, ProteinBatch, SequentialEdge, SpatialEdge,
                              load_structure)
from esm_gearnet.models import ESM, FusionNetwork, GearNet, residue_one_hot
from esm_gearnet.models.esm import WeightError, build_esm2
from conftest import assert_every_parameter_trained, assert_packed_equals_single
from test_graph import _random_rigid_motion

EC_GRAPH = lambda edge_feature=None: GraphConstruction(  # noqa: E731
    [AlphaCarbonNode()], [SequentialEdge(2), SpatialEdge(10.0, 5), KNNEdge(10, 5)], edge_feature=edge_feature)


def _tiny_fusion(fusion, seed=0, layers=2, dim=32, hidden=(32, 32), **gearnet):
    torch.manual_seed(seed)
    esm = ESM(pretrained=False, architecture=(layers, dim, 4))
    structure = GearNet(dim if fusion == "series" else 21, list(hidden), 7, batch_norm=True, concat_hidden=True,
                        short_cut=True, readout="sum", **gearnet)
    return FusionNetwork(esm, structure, fusion=fusion, cross_dim=32)


@pytest.mark.parametrize("mode", ["series", "parallel", "cross"])
def test_original_fusion_network_is_reproduced(mode, fidelity_dir, structures_dir, device):
    expected = torch.load(fidelity_dir / "expected.pt", weights_only=True)
    state = torch.load(fidelity_dir / f"{mode}.pt", weights_only=True)
    arch = expected["esm"]
    net = FusionNetwork(
        ESM(pretrained=False, architecture=(arch["num_layers"], arch["embed_dim"], arch["attention_heads"])),
        GearNet(arch["embed_dim"] if mode == "series" else 21, **expected["gearnet"]),
        fusion=mode, cross_dim=expected["cross_dim"])
    net.load_state_dict(state, strict=True)  # the original's names load as they are
    net.eval().to(device)
    batch = ProteinBatch.pack([load_structure(structures_dir / name) for name in expected["proteins"]]).to(device)
    with torch.no_grad():
        out = net(EC_GRAPH()(batch))
    for key in ("residue_feature", "graph_feature"):
        torch.testing.assert_close(out[key].cpu(), expected[mode][key], atol=1e-5 if device.type == "cpu" else 1e-4,
                                   rtol=1e-5 if device.type == "cpu" else 1e-4)


def test_sdpa_path_equals_fair_esm_with_padding(all_proteins, device):
    torch.manual_seed(0)
    sdpa = ESM(pretrained=False, architecture=(3, 64, 4)).eval().to(device)
    plain = ESM(pretrained=False, architecture=(3, 64, 4), attention="esm").eval().to(device)
    plain.load_state_dict(sdpa.state_dict())
    batch = ProteinBatch.pack([p.subresidue(torch.arange(min(len(p), 120))) for p in all_proteins[:4]]).to(device)
    mask = torch.zeros(batch.num_residue, dtype=torch.bool, device=device)
    mask[::7] = True  # masked tokens exercise token dropout's rescaling
    with torch.no_grad():
        for residue_mask in (None, mask):
            a = sdpa(batch, residue_mask=residue_mask)
            b = plain(batch, residue_mask=residue_mask)
            torch.testing.assert_close(a["residue_feature"], b["residue_feature"], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(a["graph_feature"], b["graph_feature"], atol=1e-5, rtol=1e-5)
    for layer in (0, 1, 2):  # intermediate layers too
        sdpa.repr_layer = plain.repr_layer = layer
        with torch.no_grad():
            torch.testing.assert_close(sdpa(batch)["residue_feature"], plain(batch)["residue_feature"],
                                       atol=1e-5, rtol=1e-5)


def test_tokens_and_readout_follow_fair_esm(all_proteins):
    esm = ESM(pretrained=False, architecture=(1, 32, 4)).eval()
    proteins = [all_proteins[0].subresidue(torch.arange(30)), all_proteins[1].subresidue(torch.arange(12))]
    batch = ProteinBatch.pack(proteins)
    tokens, _, _ = esm.tokenize(batch)
    converter = esm.alphabet.get_batch_converter()
    _, _, reference = converter([(p.name, p.sequence) for p in proteins])
    assert torch.equal(tokens, reference)
    with torch.no_grad():
        out = esm(batch)
        full = esm.model(reference, repr_layers=[1])["representations"][1]
    torch.testing.assert_close(out["residue_feature"][:30], full[0, 1:31], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["graph_feature"][1], full[1, 1:13].mean(0), atol=1e-5, rtol=1e-5)


def test_long_proteins_are_embedded_in_windows(all_proteins):
    esm = ESM(pretrained=False, architecture=(1, 16, 4)).eval()
    long = max(all_proteins, key=len)
    protein = long.subresidue(torch.arange(len(long)).repeat(2))  # twice the chain: longer than 1022
    length = len(protein)
    assert length > 1022
    with pytest.warns(UserWarning, match="windows of 1022"), torch.no_grad():
        out = esm(ProteinBatch.pack([all_proteins[0], protein]))["residue_feature"][len(all_proteins[0]):]
    assert out.shape == (length, 16)
    with torch.no_grad():
        first = esm(ProteinBatch.pack([protein.subresidue(torch.arange(1022))]))["residue_feature"]
        rest = esm(ProteinBatch.pack([protein.subresidue(torch.arange(1022, length))]))["residue_feature"]
    torch.testing.assert_close(out, torch.cat([first, rest]), atol=1e-5, rtol=1e-5)


def _write_official_checkpoint(folder, stem, layers=2, dim=32, heads=4, regression=True):
    model, _ = build_esm2(layers, dim, heads)
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("contact_head"):
            continue
        prefix = "encoder." if key.startswith("lm_head") else "encoder.sentence_encoder."
        state[prefix + key.replace("lm_head.", "lm_head.", 1)] = value
    cfg = argparse.Namespace(encoder_layers=layers, encoder_embed_dim=dim, encoder_attention_heads=heads,
                             token_dropout=True)
    torch.save({"model": state, "cfg": {"model": cfg}}, folder / f"{stem}.pt")
    if regression:
        torch.save({"model": {"contact_head.regression.weight": torch.zeros(1, layers * heads),
                              "contact_head.regression.bias": torch.zeros(1)}},
                   folder / f"{stem}-contact-regression.pt")
    return model


@pytest.mark.parametrize("regression", [True, False])
def test_official_checkpoint_format_loads_without_unpickling_code(tmp_path, regression, all_proteins):
    reference = _write_official_checkpoint(tmp_path, "esm2_t2_32_test", regression=regression)
    esm = ESM(path=str(tmp_path), model="esm2_t2_32_test").eval()
    for key, value in reference.state_dict().items():
        if not key.startswith("contact_head"):
            assert torch.equal(esm.model.state_dict()[key], value), key
    batch = ProteinBatch.pack(all_proteins[:2])
    with torch.no_grad():
        tokens, window, column = esm.tokenize(batch)
        expected = reference.eval()(tokens, repr_layers=[2])["representations"][2][window, column]
        torch.testing.assert_close(esm(batch)["residue_feature"], expected, atol=1e-5, rtol=1e-5)


def test_missing_weights_say_where_and_how(tmp_path):
    with pytest.raises(WeightError) as info:
        ESM(path=str(tmp_path), model="ESM-2-650M")
    message = str(info.value)
    assert "esm2_t33_650M_UR50D.pt" in message and str(tmp_path) in message
    assert "https://dl.fbaipublicfiles.com/fair-esm/models/esm2_t33_650M_UR50D.pt" in message
    assert "pretrained: false" in message
    broken = tmp_path / "esm2_t6_8M_UR50D.pt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightError, match="not a readable fair-esm checkpoint"):
        ESM(path=str(tmp_path), model="ESM-2-8M")


def test_gearnet_on_a_hand_computed_graph():
    # 5 residues, 2 relations, identity-like weights: the numbers can be worked out by hand
    batch = ProteinBatch.pack([Protein.from_sequence("GASPV", ca=torch.zeros(5, 3))])
    edges = torch.tensor([[0, 1, 0], [2, 1, 0], [3, 1, 1], [4, 0, 1], [1, 4, 0]])
    batch = batch.replace(edge_list=edges, num_relation=2)
    model = GearNet(input_dim=1, hidden_dims=[1], num_relation=2, activation=None, readout="sum")
    with torch.no_grad():
        model.layers[0].linear.weight.copy_(torch.tensor([[1.0, 10.0]]))  # relation 0 x1, relation 1 x10
        model.layers[0].linear.bias.zero_()
        model.layers[0].self_loop.weight.fill_(100.0)
        model.layers[0].self_loop.bias.zero_()
    x = torch.tensor([[1.0], [2.0], [3.0], [4.0], [5.0]])
    out = model.network(batch, x)
    # node 0: rel1 from 4 -> 10*5 + 100*1 = 150; node 1: rel0 from 0, 2 = 4, rel1 from 3 = 40, self 200 -> 244
    # node 2: self 300; node 3: self 400; node 4: rel0 from 1 = 2, self 500 -> 502
    assert out["residue_feature"].squeeze(-1).tolist() == [150.0, 244.0, 300.0, 400.0, 502.0]
    assert out["graph_feature"].item() == 1596.0


def _rotated(protein, seed):
    rotation, shift = _random_rigid_motion(seed)
    pos = (protein.atom_pos.double() @ rotation.T + shift).float() * protein.atom_mask.unsqueeze(-1)
    return protein.replace(atom_pos=pos)


@pytest.mark.parametrize("edge", [False, True], ids=["GearNet", "GearNet-Edge"])
def test_rigid_motion_and_packing_leave_outputs_unchanged(all_proteins, edge):
    extra = {"edge_input_dim": 59, "num_angle_bin": 8} if edge else {}
    net = _tiny_fusion("series", **extra).eval()
    graph_model = EC_GRAPH("gearnet" if edge else None)
    proteins = all_proteins[:4]
    with torch.no_grad():
        packed = net(graph_model(ProteinBatch.pack(proteins)))
        moved = net(graph_model(ProteinBatch.pack([_rotated(p, i) for i, p in enumerate(proteins)])))
        torch.testing.assert_close(moved["residue_feature"], packed["residue_feature"], atol=1e-4, rtol=1e-4)
        assert_packed_equals_single(lambda group: net(graph_model(ProteinBatch.pack(group))), proteins,
                                    atol=1e-4, graph_atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("mode", ["series", "parallel", "cross"])
def test_training_step_reaches_every_parameter(all_proteins, mode):
    net = _tiny_fusion(mode, edge_input_dim=59, num_angle_bin=8).train()
    graph = EC_GRAPH("gearnet")(ProteinBatch.pack(all_proteins[:3]))
    out = net(graph)
    assert out["graph_feature"].shape == (3, net.output_dim)
    out["graph_feature"].pow(2).mean().backward()
    assert_every_parameter_trained(net)


def test_input_dim_mismatch_names_the_expected_number():
    esm = ESM(pretrained=False, architecture=(1, 32, 4))
    with pytest.raises(ValueError, match="input_dim is 21 .* set structure_model.input_dim: 32"):
        FusionNetwork(esm, GearNet(21, [16], 7), fusion="series")
    with pytest.raises(ValueError, match="input_dim is 32 .*21-dim one-hot.*input_dim: 21"):
        FusionNetwork(esm, GearNet(32, [16], 7), fusion="parallel")


def test_one_hot_input_marks_unknown(all_proteins):
    batch = ProteinBatch.pack([all_proteins[0].replace(residue_type=torch.full_like(all_proteins[0].residue_type, 20))])
    assert bool((residue_one_hot(batch)[:, 20] == 1).all())
