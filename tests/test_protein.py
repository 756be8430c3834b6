"""Protein / ProteinBatch: packing, padding, sub-selection, collation, transforms."""
import torch
from torch.utils.data import DataLoader

from esm_gearnet.data import Compose, Protein, ProteinBatch, ProteinView, TruncateProtein, collate
from esm_gearnet.data.graph import GraphConstruction, SequentialEdge
from esm_gearnet.layers import functional, to_packed, to_padded


def test_pack_unpack_round_trip(all_proteins):
    proteins = all_proteins[:5]
    batch = ProteinBatch.pack(proteins)
    assert batch.num_residues.tolist() == [p.num_residue for p in proteins]
    assert batch.offsets.tolist() == [sum(p.num_residue for p in proteins[:i]) for i in range(5)]
    assert batch.sequences == [p.sequence for p in proteins]
    for original, back in zip(proteins, batch.unpack()):
        for key, value in original.residue_fields().items():
            assert torch.equal(value, getattr(back, key)), key
        assert back.chain_ids == original.chain_ids and back.name == original.name


def test_padding_helpers_match_a_loop(all_proteins):
    batch = ProteinBatch.pack(all_proteins[:4])
    padded, mask = to_padded(batch.pos, batch.num_residues, value=-1.0)
    for b, protein in enumerate(all_proteins[:4]):
        length = protein.num_residue
        assert torch.equal(padded[b, :length], protein.pos)
        assert bool((padded[b, length:] == -1).all())
        assert mask[b].sum() == length and bool(mask[b, :length].all())
    assert torch.equal(to_packed(padded, mask), batch.pos)
    assert torch.equal(to_packed(padded, batch.num_residues), batch.pos)


def test_segment_reductions_match_a_loop():
    torch.manual_seed(0)
    num_residues = torch.tensor([3, 0, 5, 1])
    x = torch.randn(9, 4)
    index = functional.segment_ids(num_residues)
    sums = functional.segment_sum(x, index, 4)
    means = functional.segment_mean(x, index, 4)
    start = 0
    for b, n in enumerate(num_residues.tolist()):
        torch.testing.assert_close(sums[b], x[start:start + n].sum(0))
        expected = x[start:start + n].mean(0) if n else torch.zeros(4)
        torch.testing.assert_close(means[b], expected)
        start += n


def test_subresidue_keeps_every_field_and_edge_consistent(all_proteins):
    batch = ProteinBatch.pack(all_proteins[:3])
    graph = GraphConstruction(edge_layers=[SequentialEdge(2)], edge_feature="residue_type")(batch)
    torch.manual_seed(1)
    mask = torch.rand(graph.num_residue) > 0.3
    sub = graph.subresidue(mask)
    kept = mask.nonzero().squeeze(-1)
    for key, value in graph.residue_fields().items():
        assert torch.equal(getattr(sub, key), value[mask]), key
    assert torch.equal(sub.residue2graph, graph.residue2graph[mask])
    assert sub.num_residues.tolist() == [int(mask[graph.residue2graph == b].sum()) for b in range(3)]
    # surviving edges are exactly the old edges between kept residues, renumbered
    old = {(int(kept[s]), int(kept[t]), int(r)) for s, t, r in sub.edge_list.tolist()}
    expected = {tuple(e) for e in graph.edge_list.tolist() if mask[e[0]] and mask[e[1]]}
    assert old == expected
    assert sub.edge_feature.shape[0] == len(sub.edge_list)
    assert graph.num_residue == batch.num_residue  # the input batch is unchanged


def test_protein_subresidue_and_transforms(all_proteins):
    protein = max(all_proteins, key=len)
    assert len(protein) > 550
    item = {"graph": protein, "targets": torch.tensor([1.0, 0.0])}
    out = Compose([ProteinView("residue"), TruncateProtein(max_length=550)])(item)
    assert out["graph"].num_residue == 550 and item["graph"] is protein
    assert torch.equal(out["graph"].atom_pos, protein.atom_pos[:550])
    torch.manual_seed(0)
    windows = set()
    for _ in range(20):
        cut = TruncateProtein(max_length=100, random=True)(protein)
        start = int(cut.residue_number[0] - protein.residue_number[0])
        windows.add(start)
        assert cut.num_residue == 100 and torch.equal(cut.atom_pos, protein.atom_pos[start:start + 100])
    assert len(windows) > 5
    short = all_proteins[0]
    assert TruncateProtein(max_length=10_000)(short) is short


def test_collate_in_a_dataloader(all_proteins):
    items = [{"graph": p, "targets": torch.tensor([float(i)]), "name": p.name} for i, p in enumerate(all_proteins[:6])]
    loader = DataLoader(items, batch_size=4, collate_fn=collate)
    first = next(iter(loader))
    assert isinstance(first["graph"], ProteinBatch) and first["graph"].batch_size == 4
    assert first["targets"].shape == (4, 1) and first["name"] == [p.name for p in all_proteins[:4]]


def test_labels_stack_and_travel(all_proteins):
    proteins = [p.replace(labels={"ec": torch.tensor([i, 1 - i]), "fold": "x"}) for i, p in enumerate(all_proteins[:2])]
    batch = ProteinBatch.pack(proteins)
    assert batch.labels["ec"].tolist() == [[0, 1], [1, 0]]
    assert batch.labels["fold"] == ["x", "x"]
    assert batch.to("cpu").labels["ec"].tolist() == [[0, 1], [1, 0]]


def test_from_sequence():
    protein = Protein.from_sequence("MKTAYZ", ca=torch.arange(18.0).view(6, 3))
    assert protein.sequence == "MKTAYX" and protein.residue_type[-1] == 20
    assert torch.equal(protein.pos, torch.arange(18.0).view(6, 3))
