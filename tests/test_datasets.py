"""EC and GO datasets on the real DeepFRI files and real structures, the preprocessing cache, downloads."""
import csv
import io
import shutil
import tarfile
import zipfile

import pytest
import torch

from conftest import SHARED_DATA, STRUCTURES
from esm_gearnet import checkpoint
from esm_gearnet.data import load_structure
from esm_gearnet.data.datasets import EnzymeCommission, GeneOntology
from esm_gearnet.data.datasets.cache import load_or_build
from esm_gearnet.data.datasets.download import DownloadError, download, extract, md5sum

DEEPFRI = SHARED_DATA / "annotations" / "deepfri"


def _index():
    path = SHARED_DATA / "structures_index.tsv"
    if not path.exists():
        pytest.skip(f"{path} is absent: these tests read the real data in ../shared/data")
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def _layout(root, folder, prefix, annotation, test_csv, rows, split_key):
    base = root / folder
    for row in rows:
        split = row[split_key].strip()
        (base / split).mkdir(parents=True, exist_ok=True)
        source = SHARED_DATA / row["file"]
        shutil.copy(source, base / split / f"{row['pdb_chain']}_{source.name.split('.', 1)[0]}.{source.name.split('.', 1)[1]}")
    for split in ("train", "valid", "test"):
        (base / split).mkdir(parents=True, exist_ok=True)
    shutil.copy(DEEPFRI / annotation, base / f"{prefix}_annot.tsv")
    shutil.copy(DEEPFRI / test_csv, base / f"{prefix}_test.csv")
    return base


def _ec_rows():
    rows = [r for r in _index() if r["ec_split"].strip() not in ("", "-") and r["file"].startswith("structures/")]
    assert len(rows) >= 10
    return rows


def _annotation(path, column=1):
    with open(path, newline="") as handle:
        lines = list(csv.reader(handle, delimiter="\t"))
    return lines, {line[0]: line for line in lines[3:] if line}


def _removed_at(test_csv, cutoff_column):
    with open(DEEPFRI / test_csv, newline="") as handle:
        return {r[0] for r in list(csv.reader(handle))[1:] if r[cutoff_column] == "0"}


@pytest.mark.parametrize("test_cutoff, column", [(0.95, 5), (0.5, 3)])
def test_enzyme_commission_on_the_real_layout(tmp_path, test_cutoff, column):
    rows = _ec_rows()
    _layout(tmp_path, "EnzymeCommission", "nrPDB-EC", "nrPDB-EC_2020.04_annot.tsv", "nrPDB-EC_2020.04_test.csv",
            rows, "ec_split")
    dataset = EnzymeCommission(tmp_path, test_cutoff=test_cutoff, progress=False)
    lines, by_chain = _annotation(DEEPFRI / "nrPDB-EC_2020.04_annot.tsv")
    terms = lines[1]
    assert len(dataset.tasks) == len(terms) == 538
    removed = _removed_at("nrPDB-EC_2020.04_test.csv", column)
    expected = [sum(r["ec_split"].strip() == s and not (s == "test" and r["pdb_chain"] in removed) for r in rows)
                for s in ("train", "valid", "test")]
    assert dataset.num_samples == expected
    for i in range(len(dataset)):
        item = dataset[i]
        chain = item["graph"].name.split("_")[0]
        listed = sorted(by_chain[chain][1].split(","))
        assert sorted(terms[j] for j in item["targets"].nonzero().flatten().tolist()) == listed
    nzo = [i for i in range(len(dataset)) if dataset.proteins.names[i].startswith("1NZO-A")]
    assert sorted(terms[j] for j in dataset.targets[nzo[0]].nonzero().flatten().tolist()) == \
        sorted(["3.4.16.-", "3.4.16.4", "3.5.2.6", "3.5.2.-"])


@pytest.mark.parametrize("branch, size", [("MF", 489), ("BP", 1943), ("CC", 320)])
def test_gene_ontology_on_the_real_layout(tmp_path, branch, size):
    lines, by_chain = _annotation(DEEPFRI / "nrPDB-GO_2019.06.18_annot.SUBSET.tsv")
    rows = [r for r in _index() if r["pdb_chain"] in by_chain and r["file"].startswith("structures/")
            and r["go_split"].strip() not in ("", "-")]
    assert len(rows) >= 8
    _layout(tmp_path, "GeneOntology", "nrPDB-GO", "nrPDB-GO_2019.06.18_annot.SUBSET.tsv",
            "nrPDB-GO_2019.06.18_test.csv", rows, "go_split")
    dataset = GeneOntology(tmp_path, branch=branch, progress=False)
    b = ["MF", "BP", "CC"].index(branch)
    terms = lines[4 * b + 1]
    assert dataset.tasks == terms and len(terms) == size
    assert sum(dataset.num_samples) == len(rows)
    for i in range(len(dataset)):
        chain = dataset.proteins.names[i].split("_")[0]
        field = by_chain[chain][b + 1] if b + 1 < len(by_chain[chain]) else ""
        expected = sorted(t for t in field.split(",") if t)
        assert sorted(terms[j] for j in dataset.targets[i].nonzero().flatten().tolist()) == expected
    with pytest.raises(ValueError, match="branch must be MF, BP or CC"):
        GeneOntology(tmp_path, branch="XX", progress=False)


def test_bad_file_is_reported_and_truncated_cache_rebuilt(tmp_path):
    if not STRUCTURES.exists():
        pytest.skip("../shared/data is absent")
    files = sorted(STRUCTURES.glob("*.pdb"))[:4]
    folder = tmp_path / "in"
    folder.mkdir()
    for f in files:
        shutil.copy(f, folder / f.name)
    (folder / "broken.pdb").write_text("HEADER    NOTHING HERE\nEND\n")
    inputs = sorted(folder.iterdir())
    cache = tmp_path / "cache.pt"
    proteins, skipped = load_or_build(inputs, cache, workers=2, progress=False)
    assert len(proteins) == 4 and [p for p, _ in skipped] == [str(folder / "broken.pdb")]
    assert "broken.pdb" in (tmp_path / "cache.pt.skipped.tsv").read_text()
    direct = load_structure(files[2])
    assert torch.equal(proteins[2].atom_pos, direct.atom_pos) and proteins[2].sequence == direct.sequence
    data = cache.read_bytes()
    cache.write_bytes(data[: len(data) // 2])  # a cache cut short (disk full, copied half)
    again, _ = load_or_build(inputs, cache, workers=0, progress=False)
    assert len(again) == 4 and torch.equal(again[1].atom_pos, proteins[1].atom_pos)
    assert checkpoint.load(cache)["format"] == "esm_gearnet.cache/2"  # rewritten whole, its digest matches
    (folder / "broken.pdb").unlink()  # other files: the key changes and the cache is rebuilt
    fewer, skipped = load_or_build(sorted(folder.iterdir()), cache, workers=0, progress=False)
    assert len(fewer) == 4 and not skipped


def test_download_checks_md5_and_extraction_stays_inside(tmp_path):
    source = tmp_path / "src" / "data.zip"
    source.parent.mkdir()
    with zipfile.ZipFile(source, "w") as handle:
        handle.writestr("EnzymeCommission/train/1ABC-A.pdb", "END\n")
    url = source.as_uri()
    got = download(url, tmp_path / "dl", md5=md5sum(source))
    assert extract(got, tmp_path / "out") and (tmp_path / "out" / "EnzymeCommission" / "train" / "1ABC-A.pdb").is_file()
    with pytest.raises(DownloadError, match="wrong md5"):
        download(url, tmp_path / "dl2", md5="0" * 32)
    assert not any((tmp_path / "dl2").iterdir())
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as handle:
        handle.writestr("../outside.txt", "x")
    with pytest.raises(DownloadError, match="outside"):
        extract(evil, tmp_path / "x")
    assert not (tmp_path / "outside.txt").exists()
    link = tmp_path / "link.tar.gz"
    with tarfile.open(link, "w:gz") as handle:
        member = tarfile.TarInfo("data/escape")
        member.type, member.linkname = tarfile.SYMTYPE, "../../etc/passwd"
        handle.addfile(member)
        payload = tarfile.TarInfo("/abs.txt")
        payload.size = 1
        handle.addfile(payload, io.BytesIO(b"x"))
    with pytest.raises(DownloadError, match="outside"):
        extract(link, tmp_path / "y")
    with pytest.raises(DownloadError, match="cannot download"):
        download((tmp_path / "missing.zip").as_uri(), tmp_path / "dl3")


def _folder_with_labels(tmp_path, rows, header):
    folder = tmp_path / "mine"
    folder.mkdir()
    for name in sorted(STRUCTURES.glob("*.pdb"))[:6]:
        shutil.copy(name, folder / name.name)
    (folder / "corrupt.pdb").write_text("not a structure\n")
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return folder, labels


def test_protein_folder_regression_with_a_given_split(tmp_path):
    if not STRUCTURES.exists():
        pytest.skip("../shared/data is absent")
    from esm_gearnet.data.datasets import ProteinFolder
    names = [p.name[:-4] for p in sorted(STRUCTURES.glob("*.pdb"))[:6]]
    splits = ["train", "train", "train", "valid", "test", "test"]
    rows = [[n, str(i * 0.5), "" if i == 2 else str(-i), s] for i, (n, s) in enumerate(zip(names, splits))]
    rows.append(["corrupt", "1.0", "1.0", "test"])
    rows.append(["no_such_file", "1.0", "1.0", "train"])
    folder, labels = _folder_with_labels(tmp_path, rows, ["id", "stability", "activity", "split"])
    dataset = ProteinFolder(folder, labels, task="regression", split="split", progress=False)
    assert dataset.tasks == ["stability", "activity"] and len(dataset) == 6  # the corrupt file is skipped
    assert [p for p, _ in dataset.skipped] == [str(folder / "corrupt.pdb")]
    assert dataset.num_samples == [3, 1, 2]
    item = dataset[1]
    assert item["graph"].name == names[1] and item["targets"].tolist() == [0.5, -1.0]
    assert torch.isnan(dataset[2]["targets"][1])


def test_protein_folder_multi_label_random_split(tmp_path):
    if not STRUCTURES.exists():
        pytest.skip("../shared/data is absent")
    from esm_gearnet.data.datasets import ProteinFolder
    names = [p.name[:-4] for p in sorted(STRUCTURES.glob("*.pdb"))[:6]]
    rows = [[n, ["kinase;binding", "binding", "", "transport", "kinase", "binding;transport"][i]]
            for i, n in enumerate(names)]
    folder, labels = _folder_with_labels(tmp_path, rows, ["id", "function"])
    dataset = ProteinFolder(folder, labels, task="multi_label", split=[0.5, 0.25, 0.25], seed=3, progress=False)
    assert dataset.tasks == ["binding", "kinase", "transport"]
    assert dataset.targets.tolist()[0] == [1, 1, 0] and dataset.targets.tolist()[2] == [0, 0, 0]
    again = ProteinFolder(folder, labels, task="multi_label", split=[0.5, 0.25, 0.25], seed=3, progress=False)
    assert again.split_indices == dataset.split_indices and sorted(sum(dataset.split_indices, [])) == list(range(6))
    with pytest.raises(ValueError, match="reads one label column"):
        ProteinFolder(folder, labels, task="classification", columns=["id", "function"], progress=False)
