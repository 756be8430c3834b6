"""A user's own encoder, in their own package, registered through the `esm_gearnet.models` entry-point group (no
dotted path in a config, no list to edit): it trains, saves, embeds and predicts through the commands' own
`main(argv)`, in-process. The encoder is defined here and registered only by the entry point of a distribution
that the test writes (a `.dist-info` folder on `sys.path`, what `pip install` of a plugin leaves)."""
import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import STRUCTURES
from esm_gearnet import registry
from esm_gearnet.commands import main
from esm_gearnet.config import ConfigError
from esm_gearnet.layers import functional
from esm_gearnet.models import StructureEncoder

ROOT = Path(__file__).resolve().parents[1]
FILES = ["1D66-A.pdb", "2N2U-A.pdb"]


class TinyPluginEncoder(StructureEncoder):
    """One linear layer over the one-hot residue types, mean over residues."""

    def __init__(self, input_dim: int, hidden_dim: int = 8, graph_construction_model=None):
        super().__init__(graph_construction_model)
        self.input_dim, self.output_dim = input_dim, hidden_dim
        self.linear = nn.Linear(input_dim, hidden_dim)

    def network(self, graph, input):
        residue = torch.relu(self.linear(input))
        return {"residue_feature": residue,
                "graph_feature": functional.readout(residue, graph.residue2graph, graph.batch_size, "mean")}


def _distribution(folder: Path, value: str) -> Path:
    """A installed-looking distribution `tiny-plugin` whose entry point `value` is in group esm_gearnet.models."""
    info = folder / "tiny_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tiny-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[esm_gearnet.models]\ntiny = {value}\n")
    return folder


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """The entry point installed; the registry forgets what it loaded before and after."""
    monkeypatch.syspath_prepend(str(_distribution(tmp_path / "site", f"{__name__}:TinyPluginEncoder")))
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    yield
    registry._REGISTRY.pop("TinyPluginEncoder", None)


def _config(tmp_path) -> Path:
    text = (ROOT / "config" / "demo" / "esm_gearnet.yaml").read_text()
    start, end = text.index("  model:\n    class: FusionNetwork"), text.index("  graph_construction_model:")
    text = text[:start] + "  model:\n    class: TinyPluginEncoder\n    hidden_dim: 8\n" + text[end:]
    text = text.replace("sequence_model_lr_ratio: 0.1\n", "")
    path = tmp_path / "tiny.yaml"
    path.write_text(text)
    return path


def test_an_encoder_of_another_package_trains_saves_embeds_and_predicts(plugin, tmp_path):
    if not STRUCTURES.exists():
        pytest.skip("../shared/data is absent: embed and predict read real structures")
    assert "TinyPluginEncoder" not in registry._REGISTRY  # not registered by being defined
    config = _config(tmp_path)
    assert main(["downstream", "-c", str(config), "--output_dir", str(tmp_path / "runs"), "--num_protein", "24",
                 "--num_epoch", "1", "--batch_size", "4"]) == 0
    run_dir, = (tmp_path / "runs").glob("MultipleBinaryClassification/DemoFolds/TinyPluginEncoder/*")
    assert (run_dir / "best.pth").is_file()
    assert registry.resolve("TinyPluginEncoder") is TinyPluginEncoder
    assert "TinyPluginEncoder" in registry.names_of(StructureEncoder)
    files = [str(STRUCTURES / name) for name in FILES]
    out = tmp_path / "embeddings.npz"
    assert main(["embed", "--ckpt", str(run_dir), *files, "-o", str(out), "--workers", "0", "--quiet"]) == 0
    with np.load(out) as saved:
        assert saved["embedding"].shape == (2, 8) and np.isfinite(saved["embedding"]).all()
    predictions = tmp_path / "predictions.csv"
    assert main(["predict", "--ckpt", str(run_dir), *files, "-o", str(predictions), "--workers", "0",
                 "--quiet"]) == 0
    with open(predictions) as handle:
        rows = list(csv.DictReader(handle))
    assert [row["id"] for row in rows] == ["1D66-A", "2N2U-A"] and all(row["top_terms"] for row in rows)


def test_without_the_entry_point_the_class_is_unknown(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    with pytest.raises(ConfigError, match="unknown class 'TinyPluginEncoder'"):
        registry.resolve("TinyPluginEncoder", "task.model")


def test_a_broken_entry_point_is_one_sentence(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(_distribution(tmp_path / "site", "no_such_module_here:Encoder")))
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    with pytest.raises(Exception, match=r"the entry point tiny = no_such_module_here:Encoder \(group "
                                        r"esm_gearnet\.models, package tiny-plugin\) cannot be imported "
                                        r"\(ModuleNotFoundError: .*\); fix or uninstall that package\.$"):
        registry.resolve("GearNet")
