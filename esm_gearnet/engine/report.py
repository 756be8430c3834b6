"""Training curves of runs: every run directory gets `curves.png`, and `script/report.py` draws several runs
side by side.

One panel per quantity: the training loss (and any other logged training value, e.g. a pre-training accuracy),
then one panel per validation metric with the test metric dashed in the same colour. One colour per run; a dotted
vertical line marks each run's best validation epoch. The x axis is the epoch. The figure is drawn from
`metrics.jsonl`, so what is plotted is what was logged. Runs are labelled by the config keys in which they
differ (their `config.yaml`), else by their directory names, unless labels are given.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

logger = logging.getLogger("esm_gearnet")
Series = Dict[str, Tuple[List[int], List[float]]]


def read_records(run_dir) -> List[Dict]:
    """The per-epoch records of a run's metrics.jsonl (the final summary left out).

    A last line cut off (a run killed while writing it) is left out with a warning naming the file and line;
    a line that is not JSON before the last is refused (the file was damaged, not cut off).

    Raises:
        FileNotFoundError: no metrics.jsonl; ValueError: a damaged line, named with its file and number.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl; is it a run directory of script/downstream.py or "
                                "script/pretrain.py?")
    numbered = [(n, line) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    records = []
    for n, line in numbered:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            if n == numbered[-1][0]:
                logger.warning("%s line %d is cut off (%s), as a run killed while writing it leaves it: drawn "
                               "without it", path, n, error.msg)
                continue
            raise ValueError(f"{path} line {n} is not a JSON record ({error.msg}, column {error.colno}) though "
                             "lines follow it: the file was damaged; repair or delete that line.") from None
    return [r for r in records if isinstance(r, dict) and "epoch" in r]


def series(records: Sequence[Dict]) -> Dict[str, Series]:
    """{panel: {"train"|"valid"|"test": (epochs, values)}}: panel "train loss", "train <value>", and one
    panel per validation metric (holding its valid and test series)."""
    panels: Dict[str, Series] = {}
    for record in records:
        for key, value in record.get("train", {}).items():
            name = f"train {key}"
            xs, ys = panels.setdefault(name, {}).setdefault("train", ([], []))
            xs.append(record["epoch"])
            ys.append(value)
        for split in ("valid", "test"):
            for key, value in (record.get(split) or {}).items():
                xs, ys = panels.setdefault(key, {}).setdefault(split, ([], []))
                xs.append(record["epoch"])
                ys.append(value)
    order = sorted(panels, key=lambda p: (not p.startswith("train "), p != "train loss", p))
    return {p: panels[p] for p in order}


def plot_runs(run_dirs: Sequence, path=None, names: Sequence[str] = None):
    """The figure of one or more runs (saved to `path` when given); returns the matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    records = [read_records(d) for d in run_dirs]
    runs = [(Path(d), series(r)) for d, r in zip(run_dirs, records)]
    names = list(names or run_labels([d for d, _ in runs]))
    if len(names) != len(runs):
        raise ValueError(f"{len(names)} label(s) for {len(runs)} run(s); give one --label per run.")
    best = [next((r["best_epoch"] for r in reversed(rs) if r.get("best_epoch") is not None), None) for rs in records]
    panels = list(dict.fromkeys(p for _, s in runs for p in s))
    columns = min(3, max(1, len(panels)))
    rows = max(1, math.ceil(len(panels) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.6 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, panel in enumerate(panels):
        axis = axes[index // columns][index % columns]
        for k, (name, (_, data)) in enumerate(zip(names, runs)):
            colour = colours[k % len(colours)]
            for split, style in (("train", "-"), ("valid", "-"), ("test", "--")):
                if split in data.get(panel, {}):
                    xs, ys = data[panel][split]
                    axis.plot(xs, ys, style, color=colour, marker="o", markersize=3,
                              label=split if len(runs) == 1 else (name if split != "test" else None))
            if best[k] is not None and not panel.startswith("train "):
                axis.axvline(best[k], color=colour, linestyle=":", linewidth=1.2,
                             label=f"best epoch {best[k]}" if len(runs) == 1 else None)
        axis.set_title(panel if panel.startswith("train ") else f"{panel} (valid solid, test dashed)", fontsize=10)
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
        if len(runs) == 1:
            axis.legend(fontsize=8)
    for index in range(len(panels), rows * columns):
        axes[index // columns][index % columns].axis("off")
    if len(runs) > 1:  # one legend for the figure: the runs' colours
        handles, labels = axes[0][0].get_legend_handles_labels()
        figure.legend(handles, labels, loc="lower center", ncol=min(len(runs), 3), fontsize=9, frameon=False)
        figure.tight_layout(rect=(0, 0.06 * math.ceil(len(runs) / 3), 1, 1))
    else:
        figure.tight_layout()
    if path is not None:
        from .. import writing

        with writing.replacing(path) as temporary:  # the temporary file has no suffix: name the format
            figure.savefig(temporary, dpi=100, format=Path(path).suffix.lstrip(".") or "png")
    return figure


def write_curves(run_dir) -> Path:
    """Redraw `run_dir/curves.png` from its metrics.jsonl."""
    from matplotlib import pyplot as plt

    path = Path(run_dir) / "curves.png"
    figure = plot_runs([run_dir], path)
    plt.close(figure)
    return path


def _flat(value, prefix: str = "") -> Dict[str, str]:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): json.dumps(value, sort_keys=True)}


def run_labels(run_dirs: Sequence[Path]) -> List[str]:
    """A label per run: the config keys in which the runs differ (`key=value`, at most three, from each run's
    config.yaml), else the last two parts of the run directory, numbered when two would be the same."""
    from ..config import ConfigError, load_run_config

    names = ["/".join(Path(d).parts[-2:]) for d in run_dirs]
    try:  # one run (its own curves, after every epoch) differs from nothing: its config is not read
        configs = [_flat(load_run_config(str(Path(d) / "config.yaml"))) for d in run_dirs] \
            if len(run_dirs) > 1 else []
    except (OSError, ConfigError):  # a run without a readable config.yaml is labelled by its directory
        configs = []
    if len(configs) > 1:
        keys = [k for k in dict.fromkeys(k for c in configs for k in c)
                if k != "output_dir" and len({c.get(k) for c in configs}) > 1]
        if keys:
            names = [", ".join(f"{k.split('.')[-1]}={c.get(k, 'null')}" for k in keys[:3]) for c in configs]
    if len(set(names)) < len(names):
        names = [f"{k + 1}: {name}" for k, name in enumerate(names)]
    return names
