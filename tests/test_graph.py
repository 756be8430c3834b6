"""Graph construction against slow brute-force references, on every real structure."""
import math

import numpy as np
import pytest
import torch

from esm_gearnet.data import (AlphaCarbonNode, GraphConstruction, KNNEdge, ProteinBatch, SequentialEdge, SpatialEdge,
                              SpatialLineGraph, load_structure)

EC_LAYERS = lambda: [SequentialEdge(2), SpatialEdge(10.0, 5), KNNEdge(10, 5)]  # noqa: E731


def _edges(edge_list):
    return sorted(map(tuple, edge_list.tolist()))


def _reference_sequential(protein, d):
    chain = protein.chain_index.tolist()
    n = protein.num_residue
    return sorted((i, j, j - i + d) for i in range(n) for j in range(max(0, i - d), min(n, i + d + 1))
                  if chain[i] == chain[j])


def _reference_neighbours(protein, cap, radius, min_distance, max_distance=None):
    """For each target i, all j != i ordered by distance (float64), cut by radius and cap, then by |i-j|."""
    pos = protein.pos.double().numpy()
    n = len(pos)
    edges = []
    for i in range(n):
        dist = np.sqrt(((pos - pos[i]) ** 2).sum(-1))
        order = [j for j in np.argsort(dist, kind="stable") if j != i]
        if radius is not None:
            order = [j for j in order if dist[j] < radius]
        order = order[:cap]
        for j in order:
            gap = abs(i - j)
            if gap >= min_distance and (not max_distance or gap <= max_distance):
                edges.append((int(j), i, 0))
    return sorted(edges)


def test_each_edge_layer_equals_brute_force_on_every_structure(all_proteins, device):
    for protein in all_proteins:
        batch = ProteinBatch.pack([protein]).to(device)
        edges, relations = SequentialEdge(2)(batch)
        assert relations == 5 and _edges(edges) == _reference_sequential(protein, 2), protein.name
        edges, _ = SpatialEdge(10.0, 5)(batch)
        assert _edges(edges) == _reference_neighbours(protein, 32, 10.0, 5), protein.name
        edges, _ = KNNEdge(10, 5)(batch)
        assert _edges(edges) == _reference_neighbours(protein, 10, None, 5), protein.name


def test_options_min_max_distance_and_uncapped_radius(all_proteins):
    protein = all_proteins[5]
    batch = ProteinBatch.pack([protein])
    edges, _ = SpatialEdge(8.0, min_distance=0, max_distance=20, max_num_neighbors=None)(batch)
    assert _edges(edges) == _reference_neighbours(protein, None, 8.0, 0, 20)
    edges, _ = KNNEdge(k=4, min_distance=2, max_distance=30)(batch)
    assert _edges(edges) == _reference_neighbours(protein, 4, None, 2, 30)
    edges, relations = SequentialEdge(3)(batch)
    assert relations == 7 and _edges(edges) == _reference_sequential(protein, 3)


def test_sequential_edges_stay_inside_a_chain(structures_dir, tmp_path):
    # two chains of one file: no sequential edge may join them
    lines = [l for l in (structures_dir / "2XHE-A.pdb").read_text().splitlines() if l.startswith("ATOM")][:400]
    chain_b = [l[:21] + "B" + l[22:] for l in (structures_dir / "2XHE-B.pdb").read_text().splitlines()
               if l.startswith("ATOM")][:400]
    path = tmp_path / "two_chains.pdb"
    path.write_text("\n".join(lines + ["TER"] + chain_b + ["END"]) + "\n")
    protein = load_structure(path)
    assert protein.chain_ids == ("A", "B")
    edges, _ = SequentialEdge(2)(ProteinBatch.pack([protein]))
    chain = protein.chain_index
    assert bool((chain[edges[:, 0]] == chain[edges[:, 1]]).all())
    assert _edges(edges) == _reference_sequential(protein, 2)


def test_batched_construction_equals_one_protein_at_a_time(all_proteins):
    model = GraphConstruction([AlphaCarbonNode()], EC_LAYERS(), edge_feature="gearnet")
    proteins = all_proteins[:8]
    batched = model(ProteinBatch.pack(proteins))
    assert batched.num_relation == 7
    offset = 0
    for b, protein in enumerate(proteins):
        single = model(ProteinBatch.pack([protein]))
        mine = batched.residue2graph[batched.edge_list[:, 1]] == b
        shifted = batched.edge_list[mine] - torch.tensor([offset, offset, 0])
        assert torch.equal(shifted, single.edge_list)  # same canonical order too
        torch.testing.assert_close(batched.edge_feature[mine], single.edge_feature)
        offset += protein.num_residue


def _random_rigid_motion(seed):
    generator = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=generator, dtype=torch.float64))
    rotation = q * torch.sign(torch.diagonal(r))
    if torch.det(rotation) < 0:
        rotation[:, 0] = -rotation[:, 0]
    return rotation, torch.randn(3, generator=generator, dtype=torch.float64) * 50


def test_rigid_motion_leaves_the_edge_set_unchanged(all_proteins):
    model = GraphConstruction([AlphaCarbonNode()], EC_LAYERS(), edge_feature="gearnet")
    for seed, protein in enumerate(all_proteins[::4]):
        rotation, shift = _random_rigid_motion(seed)
        moved_pos = (protein.atom_pos.double() @ rotation.T + shift).float() * protein.atom_mask.unsqueeze(-1)
        moved = protein.replace(atom_pos=moved_pos)
        a = model(ProteinBatch.pack([protein]))
        b = model(ProteinBatch.pack([moved]))
        assert torch.equal(a.edge_list, b.edge_list), protein.name
        torch.testing.assert_close(a.edge_feature, b.edge_feature, atol=1e-3, rtol=0)


def test_ec_graph_equals_the_original_edges(fidelity_dir, structures_dir):
    expected = torch.load(fidelity_dir / "expected.pt", weights_only=True)
    proteins = [load_structure(structures_dir / name) for name in expected["proteins"]]
    batch = ProteinBatch.pack(proteins)
    assert torch.equal(batch.residue_type, expected["residue_type"])
    assert torch.equal(batch.num_residues, expected["num_residues"])
    graph = GraphConstruction([AlphaCarbonNode()], EC_LAYERS())(batch)
    assert graph.num_relation == 7
    assert _edges(graph.edge_list) == _edges(expected["edge_list"])


def test_gearnet_edge_features_by_hand(all_proteins):
    protein = all_proteins[0]
    graph = GraphConstruction(edge_layers=EC_LAYERS(), edge_feature="gearnet")(ProteinBatch.pack([protein]))
    feature = graph.edge_feature
    assert feature.shape == (len(graph.edge_list), 59)
    for e in torch.randint(len(graph.edge_list), (50,), generator=torch.Generator().manual_seed(0)).tolist():
        s, t, r = graph.edge_list[e].tolist()
        row = feature[e]
        assert row[:20].argmax() == protein.residue_type[s] and row[:20].sum() == 1
        assert row[20:40].argmax() == protein.residue_type[t]
        assert row[40:47].argmax() == r
        assert row[47:58].argmax() == min(abs(s - t), 10)
        assert abs(float(row[58]) - float((protein.pos[s] - protein.pos[t]).norm())) < 1e-4
    residue_type = GraphConstruction(edge_layers=EC_LAYERS())(ProteinBatch.pack([protein])).edge_feature
    assert torch.equal(residue_type, feature[:, :20])


def test_spatial_line_graph_equals_brute_force(all_proteins):
    protein = all_proteins[0]
    graph = GraphConstruction(edge_layers=EC_LAYERS())(ProteinBatch.pack([protein]))
    line = SpatialLineGraph(8)(graph)
    pos = protein.pos.double()
    edges = graph.edge_list.tolist()
    incoming = {}
    for index, (s, t, _) in enumerate(edges):
        incoming.setdefault(t, []).append(index)
    expected = []
    for out_index, (b, c, _) in enumerate(edges):  # edge b -> c follows every edge a -> b
        for in_index in incoming.get(b, []):
            a = edges[in_index][0]
            v1, v2 = pos[a] - pos[b], pos[c] - pos[b]
            angle = math.acos(max(-1.0, min(1.0, float(v1 @ v2 / (v1.norm() * v2.norm())))))
            expected.append((in_index, out_index, min(int(angle / math.pi * 8), 7)))
    assert line.num_node == len(edges) and line.num_relation == 8
    ours = _edges(line.edge_list)
    assert len(ours) == len(expected)
    mismatched = set(ours) ^ set(expected)  # bins may differ only for angles within rounding of a bin edge
    assert len(mismatched) <= 4, sorted(mismatched)[:4]


@pytest.mark.parametrize("missing_ca", [True, False])
def test_alpha_carbon_node_drops_residues_without_ca(all_proteins, missing_ca):
    protein = all_proteins[1]
    mask = protein.atom_mask.clone()
    if missing_ca:
        mask[3, 1] = False
    batch = ProteinBatch.pack([protein.replace(atom_mask=mask)])
    out = AlphaCarbonNode()(batch)
    assert out.num_residue == protein.num_residue - int(missing_ca)
