"""`AlphaFoldDB`: predicted structures of whole proteomes for pre-training, one split of one species at a time.

The species are numbered as in the original (the order of the AlphaFold DB download page when it was written):
0-20 model-organism proteomes, 21 Swiss-Prot, 22-53 global-health proteomes (the original's list repeats five
of them there; the numbers are kept so its configs mean the same species). The original downloaded the v2
archives, which AlphaFold DB no longer serves; the same archives exist as v4 under
`https://ftp.ebi.ac.uk/pub/databases/alphafold/v4/`. AlphaFold DB publishes no checksums for them, so none is
checked; a damaged archive fails when it is read.

Each archive holds `AF-<UniProt>-F<n>-model_v4.pdb.gz` (and `.cif.gz`) files. As in the original, the sorted
`.pdb.gz` files are cut into splits of at most 22,000 proteins; only the chosen split is extracted and parsed.
pLDDT is the B-factor column of these files and is kept in `Protein.bfactor`.
"""
from __future__ import annotations

import math
import os
import tarfile
from pathlib import Path
from typing import Literal, Optional

import torch

from ... import writing
from ...registry import register
from .base import StructureDataset
from .cache import load_or_build
from .download import download, extract

SPECIES = [
    "UP000006548_3702_ARATH", "UP000001940_6239_CAEEL", "UP000000559_237561_CANAL", "UP000000437_7955_DANRE",
    "UP000002195_44689_DICDI", "UP000000803_7227_DROME", "UP000000625_83333_ECOLI", "UP000008827_3847_SOYBN",
    "UP000005640_9606_HUMAN", "UP000008153_5671_LEIIN", "UP000000805_243232_METJA", "UP000000589_10090_MOUSE",
    "UP000001584_83332_MYCTU", "UP000059680_39947_ORYSJ", "UP000001450_36329_PLAF7", "UP000002494_10116_RAT",
    "UP000002311_559292_YEAST", "UP000002485_284812_SCHPO", "UP000008816_93061_STAA8", "UP000002296_353153_TRYCC",
    "UP000007305_4577_MAIZE", "swissprot_pdb",
    "UP000001631_447093_AJECG", "UP000006672_6279_BRUMA", "UP000000799_192222_CAMJE", "UP000094526_86049_9EURO1",
    "UP000274756_318479_DRAME", "UP000325664_1352_ENTFC", "UP000053029_1442368_9EURO2", "UP000000579_71421_HAEIN",
    "UP000000429_85962_HELPY", "UP000007841_1125630_KLEPH", "UP000008153_5671_LEIIN", "UP000078237_100816_9PEZI1",
    "UP000000806_272631_MYCLE", "UP000001584_83332_MYCTU", "UP000020681_1299332_MYCUL", "UP000000535_242231_NEIG1",
    "UP000006304_1133849_9NOCA1", "UP000024404_6282_ONCVO", "UP000002059_502779_PARBA", "UP000001450_36329_PLAF7",
    "UP000002438_208964_PSEAE", "UP000001014_99287_SALTY", "UP000008854_6183_SCHMA", "UP000002716_300267_SHIDS",
    "UP000018087_1391915_SPOS1", "UP000008816_93061_STAA8", "UP000000586_171101_STRR6", "UP000035681_6248_STRER",
    "UP000030665_36087_TRITR", "UP000008524_185431_TRYB2", "UP000002296_353153_TRYCC", "UP000270924_6293_WUCBA",
]
BASE_URL = "https://ftp.ebi.ac.uk/pub/databases/alphafold"


def structure_members(archive: Path) -> list:
    """Sorted names of the `.pdb.gz` files in a proteome archive; the listing is kept beside the archive,
    because listing Swiss-Prot's archive takes minutes."""
    listing = archive.with_name(archive.name + ".pdb-list.txt")
    if listing.is_file() and listing.stat().st_mtime >= archive.stat().st_mtime:
        return listing.read_text().split()
    with tarfile.open(archive) as handle:
        names = sorted(m.name for m in handle.getmembers() if m.isfile() and m.name.endswith(".pdb.gz"))
    writing.write_atomic(listing, "\n".join(names) + "\n")
    return names


@register
class AlphaFoldDB(StructureDataset):
    """One split of one species' AlphaFold DB proteome; every protein is in the training split.

    Args:
        path: folder holding (or receiving) the archives, the extracted files and the caches.
        species_id: 0-53, see `SPECIES` (21 = Swiss-Prot).
        split_id: which block of `split_length` (22,000) proteins; the dataset's `num_splits` tells how many.
        version: AlphaFold DB release of the archives; split_length: proteins per split (22,000).
        transform, workers, three_di: as for the other datasets.
    """
    split_length = 22000

    def __init__(self, path, species_id: int = 0, split_id: int = 0, transform=None, version: str = "v4",
                 split_length: Optional[int] = None, workers: int = 2, progress: bool = True, verbose: int = 0,
                 atom_feature: None = None, bond_feature: None = None,
                 residue_feature: Literal["default"] = "default", three_di: bool = False):
        self.split_length = split_length or self.split_length
        if not 0 <= species_id < len(SPECIES):
            raise ValueError(f"AlphaFoldDB: species_id must be in 0..{len(SPECIES) - 1}, got {species_id}.")
        root = Path(os.path.expanduser(str(path)))
        self.species = f"{SPECIES[species_id]}_{version}"
        archive = root / f"{self.species}.tar"
        if not archive.is_file():
            download(f"{BASE_URL}/{version}/{archive.name}", root)
        members = structure_members(archive)
        self.num_splits = max(1, math.ceil(len(members) / self.split_length))
        if not 0 <= split_id < self.num_splits:
            raise ValueError(f"AlphaFoldDB: split_id must be below {self.num_splits} for {self.species} "
                             f"({len(members)} proteins in splits of {self.split_length}), got {split_id}.")
        chosen = members[split_id * self.split_length:(split_id + 1) * self.split_length]
        folder = root / self.species
        absent = {m for m in chosen if not (folder / m).is_file()}
        if absent:
            extract(archive, folder, select=absent.__contains__)
        self.proteins, self.skipped = load_or_build([folder / m for m in chosen],
                                                    root / f"{self.species}_{split_id}.cache.pt",
                                                    options={"dataset": "AlphaFoldDB"}, workers=workers,
                                                    progress=progress, three_di=three_di)
        self.tasks = []
        self.targets = torch.zeros(len(self.proteins), 0)
        self.split_indices = [list(range(len(self.proteins))), [], []]
        self.transform = transform
