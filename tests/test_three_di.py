"""Foldseek 3Di tokens (`esm_gearnet.data.three_di`): equal to mini3di's encoder on every real structure,
invariant to rigid motions, the placeholder rule, multi-chain proteins, and the dataset cache that keeps them."""
import shutil

import mini3di
import numpy as np
import pytest
import torch

from conftest import STRUCTURES, structure_files, write_psr
from esm_gearnet import checkpoint
from esm_gearnet.data import (THREE_DI_LETTERS, Protein, ProteinBatch, TruncateProtein, constants, load_structure,
                              three_di, three_di_letters, three_di_states)
from esm_gearnet.data.datasets import DemoFolds, ProteinFolder, PSRDataset, cache
from esm_gearnet.data.datasets.cache import PackedProteins, load_or_build
from esm_gearnet.data.foldseek import NO_STATE

ENCODER = mini3di.Encoder()


def _atoms(protein: Protein, rows=slice(None)):
    """(CA, CB, N, C) float32 [L, 3] arrays as mini3di's own `encode_chain` builds them (NaN where an atom is
    missing), the CB slot looked up by atom name in the residue's atom14 layout."""
    pos, mask = protein.atom_pos[rows].numpy(), protein.atom_mask[rows].numpy()
    types = protein.residue_type[rows].tolist()

    def atom(name):
        out = np.full((len(types), 3), np.nan, dtype=np.float32)
        for i, t in enumerate(types):
            slot = constants.ATOM_SLOTS[t].get(name)
            if slot is not None and mask[i, slot]:
                out[i] = pos[i, slot]
        return out

    return atom("CA"), atom("CB"), atom("N"), atom("C")


def _mini3di(protein: Protein) -> str:
    """mini3di's encoder called directly, chain by chain (Foldseek encodes each chain on its own)."""
    letters = [""] * protein.num_residue
    for chain in protein.chain_index.unique().tolist():
        rows = (protein.chain_index == chain).nonzero().flatten().numpy()
        text = ENCODER.build_sequence(ENCODER.encode_atoms(*_atoms(protein, rows)))
        for i, letter in zip(rows, text):
            letters[i] = letter
    return "".join(letters)


def test_three_di_equals_mini3di_on_every_real_structure(all_proteins):
    assert len(all_proteins) == 46 and sum(len(p.chain_ids) for p in all_proteins) == 46
    assert {f.suffix for f in structure_files()} == {".pdb", ".cif"}
    for protein in all_proteins:
        text = three_di(protein)
        assert text == _mini3di(protein), protein.name
        assert len(text) == protein.num_residue and set(text) <= set(THREE_DI_LETTERS)
        states = three_di_states(protein)
        assert states.dtype == torch.long and states.shape == (protein.num_residue,)
        # these files have every N, CA, C atom: only the chain ends lack a state, and they read D as in Foldseek
        assert (states == NO_STATE).nonzero().flatten().tolist() == [0, protein.num_residue - 1], protein.name
        assert text[0] == text[-1] == "D" and three_di(protein, placeholder="#")[::len(text) - 1] == "##"
        assert three_di_letters(states) == text


def _near_ties(protein: Protein, gap: float = 1e-4) -> set:
    """Residues whose state hangs on a near tie: two candidate partners at virtual-centre distances within `gap`
    Å, or an embedding within `gap` (squared distance) of two centroids. float32 rounding of moved coordinates
    may pick either side there."""
    ca, cb, n, c = (a.astype(np.float64) for a in _atoms(protein))
    center = np.ma.getdata(mini3di.VirtualCenterEncoder().encode_atoms(ca, cb, n, c))
    distance = np.linalg.norm(center[:, None] - center[None], axis=-1)
    np.fill_diagonal(distance, np.inf)
    distance[:, [0, -1]] = np.inf
    nearest = np.sort(distance, axis=1)[:, :2]
    ties = set(np.flatnonzero(nearest[:, 1] - nearest[:, 0] < gap).tolist())
    descriptors = mini3di.FeatureEncoder().encode_atoms(ca, cb, n, c).data
    embedding = descriptors
    for layer in ENCODER.vae_encoder.layers[:-1]:  # the last layer picks the nearest centroid
        embedding = layer(embedding)
    to_centroid = np.sort(((embedding[:, None] - ENCODER._CENTROIDS[None]) ** 2).sum(-1), axis=1)
    return ties | set(np.flatnonzero(to_centroid[:, 1] - to_centroid[:, 0] < gap).tolist())


def test_three_di_is_unchanged_by_a_random_rigid_motion(all_proteins):
    """Every residue keeps its state, except possibly at a near tie (4 of the 9,952 residues here): over 20
    random motions, 3 changes were seen, each at one of them, e.g. 1S3P-A residue 53 whose two nearest partners
    are 5.33037 and 5.33041 Å away."""
    generator = torch.Generator().manual_seed(0)
    changed, total, ties = 0, 0, 0
    for protein in all_proteins:
        q, r = torch.linalg.qr(torch.randn(3, 3, generator=generator, dtype=torch.float64))
        rotation = q * torch.sign(torch.diagonal(r))
        if torch.det(rotation) < 0:
            rotation[:, 0] = -rotation[:, 0]
        shift = 100 * torch.randn(3, generator=generator, dtype=torch.float64)
        moved = protein.replace(atom_pos=(protein.atom_pos.double() @ rotation.T + shift).float())
        before, after = three_di_states(protein), three_di_states(moved)
        near = _near_ties(protein)
        differ = set((before != after).nonzero().flatten().tolist())
        assert differ <= near, (protein.name, sorted(differ - near))
        changed, total, ties = changed + len(differ), total + protein.num_residue, ties + len(near)
    assert total > 9000 and ties < total / 1000 and changed <= ties  # near ties are rare


def _partners(protein: Protein) -> np.ndarray:
    """Foldseek's partner of every residue: the nearest virtual centre among the complete interior residues
    other than itself (-1 for none)."""
    ca, cb, n, c = (a.astype(np.float64) for a in _atoms(protein))
    complete = ~(np.isnan(ca).any(1) | np.isnan(n).any(1) | np.isnan(c).any(1))
    center = np.ma.getdata(mini3di.VirtualCenterEncoder().encode_atoms(ca, cb, n, c))
    length = len(ca)
    out = np.full(length, -1)
    for i in range(1, length - 1):
        candidates = [j for j in range(1, length - 1) if j != i and complete[j]]
        if candidates:
            out[i] = min(candidates, key=lambda j: np.linalg.norm(center[i] - center[j]))
    return out


@pytest.mark.parametrize("atom", ["N", "C"])
def test_placeholder_rule_on_a_missing_backbone_atom(structures_dir, atom):
    protein = load_structure(structures_dir / "1D66-A.pdb")
    length = protein.num_residue
    # remove the atom from the residue most often chosen as a partner, so that the rule about partners is tested
    partners = _partners(protein)
    site = int(np.bincount(partners[partners >= 0]).argmax())
    assert 2 < site < length - 3 and protein.atom_mask[site, 4]  # it has a CB: a missing C alone keeps its CB
    mask = protein.atom_mask.clone()
    mask[site, constants.BACKBONE_ATOMS.index(atom)] = False
    damaged = protein.replace(atom_mask=mask)

    partners = _partners(damaged)
    assert site not in partners.tolist()  # an incomplete residue is nobody's partner
    placed = {i for i in range(1, length - 1) if partners[i] >= 0 and
              not {i - 1, i, i + 1, partners[i] - 1, partners[i], partners[i] + 1} & {site}}
    states = three_di_states(damaged)
    assert {i for i in range(length) if states[i] != NO_STATE} == placed
    assert {0, site - 1, site, site + 1, length - 1}.isdisjoint(placed)
    text, masked = three_di(damaged), three_di(damaged, placeholder="#")
    assert [i for i, letter in enumerate(masked) if letter == "#"] == sorted(set(range(length)) - placed)
    assert all(text[i] == "D" for i in range(length) if i not in placed)
    # residues whose partner and descriptors do not involve the damaged residue keep their state
    original, old_partners = three_di_states(protein), _partners(protein)
    for i in placed:
        if partners[i] == old_partners[i]:
            assert states[i] == original[i], i
    assert text == _mini3di(damaged)


def test_short_chains_and_empty_proteins_have_no_state(structures_dir):
    protein = load_structure(structures_dir / "1D66-A.pdb")
    # the placeholder tells a residue without a state from one whose state is D: "#" marks exactly the residues
    # three_di_states leaves at NO_STATE, and Foldseek's default string writes D there
    for length in (1, 2, 3):
        short = protein.subresidue(torch.arange(length))
        assert three_di(short, placeholder="#") == "#" * length and three_di(short) == "D" * length
    # DEVIATION from mini3di, which gives the middle residue of 3 a state from a partner that Foldseek refuses
    assert _mini3di(protein.subresidue(torch.arange(3))) == "DVD"
    four = protein.subresidue(torch.arange(4))  # two interior residues: partners exist, the chain ends have none
    masked = three_di(four, placeholder="#")
    assert masked[0] == masked[3] == "#" and "#" not in masked[1:3]
    assert three_di(four) == masked.replace("#", "D") == _mini3di(four)
    assert three_di(protein.subresidue(torch.arange(0))) == ""
    ca_only = Protein.from_sequence("ACDEF", ca=torch.randn(5, 3))  # CA only: no N, C
    assert three_di(ca_only, placeholder="#") == "#####" and three_di(ca_only) == "DDDDD"
    with pytest.raises(ValueError, match="one character"):
        three_di(protein, placeholder="##")


def _two_chains(first: Protein, second: Protein) -> Protein:
    fields = {k: torch.cat([getattr(first, k), getattr(second, k)]) for k in first.residue_fields()}
    fields["chain_index"] = torch.cat([first.chain_index, second.chain_index + 1])
    return Protein(**fields, chain_ids=("A", "B"), name="pair")


def test_each_chain_is_encoded_on_its_own(all_proteins):
    first, second = all_proteins[3], all_proteins[4]
    pair = _two_chains(first, second)
    assert three_di(pair) == three_di(first) + three_di(second) == _mini3di(pair)
    # chains in any order of the rows: the residues of a chain are read in their order
    order = torch.randperm(pair.num_residue, generator=torch.Generator().manual_seed(0))
    shuffled = pair.subresidue(torch.cat([order[pair.chain_index[order] == 0], order[pair.chain_index[order] == 1]]))
    assert three_di(shuffled) == _mini3di(shuffled)


def test_protein_and_batch_keep_the_states_aligned(all_proteins):
    proteins = [p.replace(three_di_state=three_di_states(p)) for p in all_proteins[:3]]
    long = max(all_proteins, key=len)
    long = long.replace(three_di_state=three_di_states(long))
    cut = TruncateProtein(max_length=100, random=True)(long)
    start = int((long.residue_number == cut.residue_number[0]).nonzero()[0])
    assert torch.equal(cut.three_di_state, long.three_di_state[start:start + 100])  # the whole protein's states
    batch = ProteinBatch.pack(proteins)
    assert torch.equal(batch.three_di_state, torch.cat([p.three_di_state for p in proteins]))
    for original, back in zip(proteins, batch.unpack()):
        assert torch.equal(back.three_di_state, original.three_di_state)
    keep = torch.rand(batch.num_residue, generator=torch.Generator().manual_seed(0)) > 0.5
    assert torch.equal(batch.subresidue(keep).three_di_state, batch.three_di_state[keep])
    assert ProteinBatch.pack([proteins[0], all_proteins[1]]).three_di_state is None  # not every protein has it
    assert all_proteins[0].three_di_state is None and "three_di_state" not in all_proteins[0].residue_fields()


def _count_parses(monkeypatch):
    calls = []
    parse = cache.load_structures

    def counting(*args, **kwargs):
        calls.append(kwargs.get("three_di", False))
        return parse(*args, **kwargs)

    monkeypatch.setattr(cache, "load_structures", counting)
    return calls


def test_cache_keeps_the_states_and_is_rebuilt_when_they_are_asked_for(tmp_path, monkeypatch):
    files = structure_files()
    if not files:
        pytest.skip("../shared/data is absent")
    calls = _count_parses(monkeypatch)
    path = tmp_path / "cache.pt"
    plain, _ = load_or_build(files, path, workers=0, progress=False)
    assert "three_di_state" not in plain.fields and plain[0].three_di_state is None
    # the key of a cache without 3Di is the one it had before the option existed
    assert checkpoint.load(path)["key"] == cache.cache_key(files, {"chain": None})
    with_states, _ = load_or_build(files, path, workers=2, progress=False, three_di=True)  # rebuilt: other key
    again, _ = load_or_build(files, path, workers=0, progress=False, three_di=True)  # loaded
    assert calls == [False, True]
    assert len(with_states) == len(again) == len(files)
    for i, file in enumerate(files):
        direct = three_di(load_structure(file))
        assert three_di_letters(with_states[i].three_di_state) == three_di_letters(again[i].three_di_state) == direct
    assert with_states.fields["three_di_state"].dtype == torch.long
    # a cache of the right key that lacks the states (a faulty writer) is inconsistent: rebuilt
    state = plain.state()
    PackedProteins.check(state)
    with pytest.raises(ValueError, match="lacks fields.three_di_state"):
        PackedProteins.check(state, three_di=True)
    PackedProteins.check(PackedProteins.pack([], [], three_di=True).state(), three_di=True)  # no protein parsed
    bad = dict(state, fields=dict(state["fields"], three_di_state=torch.zeros(3, dtype=torch.uint8)))
    with pytest.raises(ValueError, match="fields.three_di_state is not a torch.int64 tensor of shape \\[N\\]"):
        PackedProteins.check(bad)


def test_datasets_asked_for_three_di_carry_it(tmp_path):
    if not STRUCTURES.exists():
        pytest.skip("../shared/data is absent")
    folder = tmp_path / "mine"
    folder.mkdir()
    files = sorted(STRUCTURES.glob("*.pdb"))[:4]
    for file in files:
        shutil.copy(file, folder / file.name)
    labels = tmp_path / "labels.csv"
    labels.write_text("id,value\n" + "".join(f"{f.stem},{i}\n" for i, f in enumerate(files)))
    plain = ProteinFolder(folder, labels, split=[0.5, 0.25, 0.25], progress=False, workers=0)
    assert plain[0]["graph"].three_di_state is None
    dataset = ProteinFolder(folder, labels, split=[0.5, 0.25, 0.25], progress=False, workers=0, three_di=True)
    for i, file in enumerate(files):
        graph = dataset[i]["graph"]
        assert three_di_letters(graph.three_di_state) == three_di(load_structure(file)), file.name
    write_psr(tmp_path)
    psr = PSRDataset(tmp_path, workers=0, progress=False, three_di=True)
    for i in range(len(psr)):
        graph = psr[i]["graph"]
        assert torch.equal(graph.three_di_state, three_di_states(graph))
    demo = DemoFolds(num_protein=4, three_di=True)
    assert all(torch.equal(p.three_di_state, three_di_states(p)) for p in demo.proteins)
    assert (demo.proteins[0].three_di_state != NO_STATE).sum() == demo.proteins[0].num_residue - 2
