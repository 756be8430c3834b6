"""Render the benchmark tables from `benchmarks/results/*.json` into the Markdown files that show them.

    python benchmarks/figures.py           # make figures: rewrite every block whose figures changed
    python benchmarks/figures.py --check   # exit 1 naming each block that is not what its results render

A block is the text between `<!-- figures: NAME -->` and `<!-- /figures -->` in README.md, benchmarks/README.md
or a page of docs/; NAME is a function of this file (`RENDER`). Each block ends with the command that measured
its figures, when, at which commit and on what machine, read from the results file, so no figure is copied by
hand. `python benchmarks/record.py SCRIPT` writes a results file (`make bench` records them all).
"""
import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PAGES = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(<!-- figures: (\w+) -->\n)(.*?)(<!-- /figures -->)", re.S)


def load(name):
    path = RESULTS / f"{name}.json"
    if not path.exists():
        raise SystemExit(f"{path.relative_to(ROOT)} is missing: run `python benchmarks/record.py {name}`.")
    return json.loads(path.read_text())


def results(name, benchmark=None):
    record = load(name)
    return [r for r in record["results"] if benchmark is None or r["benchmark"] == benchmark]


def provenance(*names):
    """How the figures above were measured: one line per results file."""
    lines = []
    for name in names:
        r = load(name)
        m = r["machine"]
        lines.append(f"`{r['command']}`: {r['measured']}, commit {r['commit']}, {m['cpu']} ({m['cores']} cores, "
                     f"load average {m['load_average'][0]} → {m['load_average'][1]}), Python {m['python']}, "
                     f"torch {m['torch']}.")
    return "\n".join(["", "Measured with " + lines[0]] + [f"and {line}" for line in lines[1:]]) + "\n"


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(out) + "\n"


def ratio(x):
    return f"{x:.2f}×"


def structure_io():
    r = results("structure_io")[0]
    rows = [["bare `gemmi.read_structure` (parse only)", f"{r['gemmi_read_structures_per_s']} structures/s"],
            ["`esm_gearnet.load_structure` (parse, check, featurise)", f"{r['esm_gearnet_structures_per_s']} "
             "structures/s"],
            ["`load_structures`, 2 workers", f"{r['esm_gearnet_2_workers_structures_per_s']} structures/s"],
            ["biotite (parse into an AtomArray)", f"{r['biotite_structures_per_s']} structures/s"
             if r.get("biotite_structures_per_s") else "not installed"],
            ["time vs bare gemmi, all files in a row", ratio(r["ratio_to_bare_gemmi_all_files"])],
            ["time vs bare gemmi, median file (side by side)", ratio(r["ratio_to_bare_gemmi_median_file"])],
            ["time vs bare gemmi, worst file", ratio(r["ratio_to_bare_gemmi_worst_file"])]]
    rows += [[f"faster than TorchDrug's `Protein.from_pdb` on {key.rsplit('_', 1)[1]}", f"{r[key]}×"]
             for key in sorted(r) if key.startswith("speedup_vs_torchdrug")]
    return (f"{r['files']} real structures.\n\n" + table(["figure", "measured"], rows)
            + provenance("structure_io"))


def graph_construction():
    rows = [[r["device"], r["batch_size"], r["proteins_per_s"], r["line_graph_proteins_per_s"], r["edges"]]
            for r in results("graph_construction")]
    return table(["device", "batch", "EC graph, proteins/s", "spatial line graph, proteins/s", "edges"], rows) \
        + provenance("graph_construction")


def three_di():
    r = results("three_di")[0]
    rows = [[key.replace("three_di", "3Di").replace("_", " "), value] for key, value in r.items() if key != "benchmark"]
    return table(["figure", "value"], rows) + provenance("three_di")


def encoders():
    rows = [[r["encoder"], r["device"], r["batch_size"], r["residues"], r["proteins_per_s"]]
            for r in results("encoders")]
    return table(["encoder, forward + backward", "device", "proteins", "residues", "proteins/s"], rows) \
        + provenance("encoders")


def dataset():
    r = results("dataset")[0]
    rows = [["preprocessing into the cache", f"{r['structures_per_s']} structures/s ({r['files']} files, "
             f"{r['workers']} workers)"],
            ["cache size", f"{r['cache_mib']} MiB"], ["cache open (digest checked)", f"{r['cache_open_s']} s"],
            ["all proteins built from the cache", f"{r['cache_iterate_s']} s"],
            ["digest", f"{r['digest_s_per_gib']} s per GiB"]]
    rows += [[f"DataLoader supply, {w} workers", f"{rate} proteins/s"]
             for w, rate in r["loader_proteins_per_s"].items()]
    return table(["figure", "measured"], rows) + provenance("dataset")


def esm_attention():
    padded = [[r["model"], r["precision"], f"{r['batch']} × {r['length']}", r["fair_esm_fwd_s"], r["sdpa_fwd_s"],
               ratio(r["speedup_fwd"]), r["fair_esm_fwd_bwd_s"], r["sdpa_fwd_bwd_s"], ratio(r["speedup_fwd_bwd"])]
              for r in results("esm_attention", "esm")]
    unpadded = [[r["model"], r["precision"], f"{r['proteins']} proteins, {r['tokens']} tokens "
                 f"({r['padded_tokens']} padded)", ratio(r["speedup_fwd"]), ratio(r["speedup_fwd_bwd"]),
                 f"{r['feature_relative_difference']:.1e}"] for r in results("esm_attention", "esm_unpadded")]
    text = table(["ESM-2", "precision", "batch", "fair-esm fwd s", "SDPA fwd s", "speed-up", "fair-esm fwd+bwd s",
                  "SDPA fwd+bwd s", "speed-up"], padded)
    if unpadded:
        text += "\nUnpadded (`varlen`) against padded SDPA on real lengths:\n\n" + table(
            ["ESM-2", "precision", "batches", "fwd speed-up", "fwd+bwd speed-up", "feature rel. difference"],
            unpadded)
    return text + provenance("esm_attention")


EMBED_ENGINES = {"esm_gearnet_varlen": "esm_gearnet varlen (`embed`)", "esm_gearnet_sdpa": "esm_gearnet sdpa",
                 "fair_esm": "fair-esm", "transformers_sdpa": "transformers sdpa"}


def embed():
    rows = []
    for r in results("embed"):
        reference = r.get("fair_esm", {}).get("proteins_per_s")
        for key, label in EMBED_ENGINES.items():
            if key in r:
                f = r[key]
                rows.append([r["model"], r["precision"], label, f["proteins_per_s"], f["tokens_per_s"], f["mfu"],
                             ratio(f["proteins_per_s"] / reference) if reference else "—"])
    return table(["ESM-2", "precision", "engine", "proteins/s", "tokens/s", "MFU", "vs fair-esm"], rows) \
        + provenance("embed")


def saprot_step():
    r = results("saprot_step")[0]
    rows = [[name, f["ms_per_step"], ratio(f["ratio_to_esm2"])] for name, f in r.items()
            if isinstance(f, dict) and "ms_per_step" in f]
    return table(["language model", "ms per step", "vs ESM-2"], rows) + provenance("saprot_step")


def startup():
    rows = []
    for name, row in results("startup")[0]["sizes"].items():
        build = row["build"]
        rows.append([f"ESM-2 {name}", f"{row['weights_gib']:.2f} GiB", f"{row['read']['seconds']:.2f} s",
                     f"{build['seconds']:.2f} s ({ratio(build['time_vs_read'])} the read)",
                     f"{ratio(build['peak_vs_weights'])} the weights"]
                    + ([f"{row['before']['seconds']:.2f} s, peak {ratio(row['before']['peak_vs_weights'])}"]
                       if "before" in row else []))
    header = ["weights", "size", "read whole", "build", "peak memory"]
    if any(len(row) > len(header) for row in rows):
        header.append("before")
    return table(header, rows) + provenance("startup")


# the order of benchmarks/train_step.py: cumulative up to `sparse`, then each option on top of it
TRAIN_STEP_LEVERS = ["baseline", "sdpa", "bucket", "sparse", "bf16", "unpadded", "unpadded_random", "compile",
                     "checkpoint", "frozen", "cache", "esmc"]


def train_step(name="train_step", model="ESM-2"):
    r = results(name, "train_step")[0]
    levers = {k: v for k, v in r.items() if isinstance(v, dict) and "proteins_per_s" in v}
    order = [name for name in TRAIN_STEP_LEVERS if name in levers] + sorted(set(levers) - set(TRAIN_STEP_LEVERS))

    def difference(value):
        return "—" if value is None else f"{value:.1e}" if value else "0"

    rows = [[lever, f["proteins_per_s"], f["residues_per_s"], f["padding"], f["peak_memory_gib"],
             f.get("esm_mfu", "—"), difference(f.get("loss_difference")), difference(f.get("gradient_difference")),
             ratio(f["ratio"])] for lever, f in ((lever, levers[lever]) for lever in order)]
    return (f"{model} {' × '.join(map(str, r['esm']))} (layers × width × heads), batch {r['batch']}, "
            f"{r['device']}.\n\n" + table(["lever", "proteins/s", "residues/s", "padded / real", "peak GiB",
                                           "ESM MFU", "loss rel. diff", "grad rel. diff", f"vs {order[0]}"], rows)
            + provenance(name))


def train_step_esmc():
    """ESM C beside ESM-2 of the same layers, width and heads: the `sparse` step and the `esmc` lever."""
    return train_step("train_step_esmc", "ESM-2 and ESM C")


STREAM_PATHS = {"foldcomp": "FoldComp (`FoldCompDB.item`)", "foldcomp_3di": "FoldComp + 3Di (`three_di=True`)",
                "pdb_gz": "`.pdb.gz` (`read_structure_arrays`)", "pdb_gz_3di": "`.pdb.gz` + 3Di",
                "get_data": "`foldcomp.get_data` alone"}


def stream():
    r = results("stream")[0]
    d, target = r["decode"], r["targets"]
    rows = [[label, d[key]["proteins_per_s"], d[key]["residues_per_s"],
             ratio(d[key]["vs_pdb_gz"]) if "vs_pdb_gz" in d[key] else "—"] for key, label in STREAM_PATHS.items()]
    small, large = r["memory"]["small"], r["memory"]["large"]
    first = r["first_batch"]["large"]
    figures = [["decoded + cropped per worker, FoldComp", f"{d['foldcomp']['proteins_per_s']} proteins/s",
                f"≥ {target['proteins_per_s']} proteins/s"],
               [f"resident memory after {r['batch']}-protein batches, {small['entries']:,} → {large['entries']:,} "
                "entries", f"{small['rss_mb']:.0f} → {large['rss_mb']:.0f} MB (+{r['memory_growth_mb']} MB)",
                f"growth < {target['memory_growth_mb']} MB"],
               [f"`FoldCompDB(path)` to the first batch of {r['batch']}, {first['entries']:,} entries, 1 worker",
                f"{first['first_batch_s']} s (open {first['open_s']} s)", f"< {target['first_batch_s']} s"]]
    return (f"{r['structures']} real structures, {r['mean_residues']} residues on average; a FoldComp record "
            f"{r['record_bytes']:,} bytes, its `.pdb.gz` {r['pdb_gz_bytes']:,} bytes. Decoding: one process at one "
            f"thread, {r['sample']} proteins per path and round, the median of {r['rounds']} rounds.\n\n"
            + table(["path, with the pre-training crop", "proteins/s", "residues/s", "vs `.pdb.gz`"], rows) + "\n"
            + table(["figure", "measured", "target"], figures) + provenance("stream"))


def train_step_stream():
    r = results("train_step_stream", "train_step")[0]
    f = r["stream"]
    rows = [[f["threads"], f["proteins_per_s"], f["residues_per_s"], f["step_s"], f["steps"],
             f["data_wait_ms_per_step"], f"{100 * f['data_wait_share']:.2f} %",
             f"{100 * f['data_wait_share_after_first']:.2f} %", f["first_batch_s"]]]
    return (f"ESM-2 {' × '.join(map(str, r['esm']))} (layers × width × heads), batch {r['batch']}, {r['device']}; "
            "the `sparse` step fed by `engine.stream.loader` with 1 DataLoader worker. Target: a wait under 2 % "
            "of the step time.\n\n"
            + table(["step threads", "proteins/s", "residues/s", "s per step", "steps timed", "wait ms per step",
                     "wait / step time", "without epochs' first batch", "first batch s"], rows)
            + provenance("train_step_stream"))


def sharding_memory():
    r = results("sharding_memory", "sharding_memory")[0]
    rows = [[row["ranks"], row["strategy"], f"{row['parameters_mb']:.1f}", f"{row['gradients_mb']:.1f}",
             f"{row['optimizer_mb']:.1f}", f"{row['held_mb']:.1f}", f"{row['held_vs_one_process']:.3f}",
             f"{1 / row['ranks'] if row['strategy'] == 'fsdp' else 1:.3f}", f"{row['peak_rss_mb']:.0f}"]
            for row in r["rows"]]
    return (f"ESM-2 {' × '.join(map(str, r['esm']))} (layers × width × heads, random weights) in serial fusion with "
            "the EC config's GearNet, Adam, after training steps on two short real proteins per rank; MB held by the "
            "largest rank (local shards of sharded tensors), its share of one process's, and the ideal share.\n\n"
            + table(["ranks", "strategy", "parameters", "gradients", "optimizer", "held", "held / one process",
                     "ideal", "peak RSS MB"], rows) + provenance("sharding_memory"))


def lora():
    r = results("lora", "lora")[0]
    rows = [[row, f"{f['trainable']:,}", f"{f['trainable_lm']:,} of {f['lm_parameters']:,}",
             f"{f['parameters_mib'] + f['gradients_mib'] + f['adam_mib']:.0f}", f"{f['peak_mib']:.0f}"]
            for row, f in r["rows"].items()]
    return (f"ESM-2 {r['esm'].replace(',', ' × ')} (random weights) in serial fusion with the EC config's GearNet, "
            f"LoRA rank {r['rank']} on q, k, v, out; a batch of {r['batch']} real proteins "
            f"({r['rows']['full']['residues']} residues), {r['device']}; each row in a fresh process, its second "
            "step (Adam's state exists from the first).\n\n"
            + table(["row", "trainable parameters", "of the language model's", "parameters + gradients + Adam MiB",
                     "peak MiB"], rows)
            + f"\nLoRA trains {r['trainable_ratio']:.3f}× the parameters of full fine-tuning and peaks at "
              f"{r['peak_ratio']:.2f}× its memory (GearNet and the head train fully in both).\n" + provenance("lora"))


def peak():
    rows = [[r["device"], r["dtype"], f"{r['size']}³", r["tflops"]] for r in results("peak")]
    return table(["device", "dtype", "matrix product", "TFLOP/s"], rows) + provenance("peak")


def headline():
    """The README's few figures, each from its results file."""
    s = results("structure_io")[0]
    t = {k: v for k, v in results("train_step", "train_step")[0].items() if isinstance(v, dict)}
    e = [r for r in results("embed") if r["precision"] == "fp32"]
    rows = [["parse + featurise real PDB/mmCIF files", f"{s['esm_gearnet_structures_per_s']} structures/s; "
             f"{s['speedup_vs_torchdrug_5YH2']}× TorchDrug's parser on 5YH2", "`benchmarks/structure_io.py`"],
            ["EC training step, the default fast path vs the original's path",
             f"{ratio(t['sparse']['ratio'])} (SDPA + length buckets + sparse aggregation)",
             "`benchmarks/train_step.py`"]]
    rows += [[f"frozen {r['model']} embedding, `embed` vs fair-esm",
              ratio(r["esm_gearnet_varlen"]["proteins_per_s"] / r["fair_esm"]["proteins_per_s"]),
              "`benchmarks/embed.py`"] for r in e]
    st = results("startup")[0]["sizes"]
    big = max(st, key=lambda name: st[name]["weights_gib"])
    rows.append([f"pretrained ESM-2 {big} start-up", f"{ratio(st[big]['build']['time_vs_read'])} the time of "
                 f"reading its file; peak {ratio(st[big]['build']['peak_vs_weights'])} the weights",
                 "`benchmarks/startup.py`"])
    d = results("stream")[0]
    rows.append(["FoldComp entries decoded + cropped, one worker", f"{d['decode']['foldcomp']['proteins_per_s']} "
                 f"proteins/s ({ratio(d['decode']['foldcomp']['vs_pdb_gz'])} `.pdb.gz`); a 1 M-entry database "
                 f"to its first batch in {d['first_batch']['large']['first_batch_s']} s", "`benchmarks/stream.py`"])
    machine = load("train_step")["machine"]
    return (table(["what", "measured", "script"], rows)
            + f"\nOn {machine['cpu']} ({machine['cores']} cores, shared: the load average is given with each), no GPU; "
              "how and when each was measured: "
              "[benchmarks/README.md](benchmarks/README.md).\n")


RENDER = {f.__name__: f for f in (structure_io, graph_construction, three_di, encoders, dataset, esm_attention,
                                  embed, saprot_step, startup, train_step, train_step_esmc, train_step_stream,
                                  stream, peak,
                                  sharding_memory, lora,
                                  headline)}


def render_page(text, path):
    def block(match):
        name = match.group(2)
        if name not in RENDER:
            raise SystemExit(f"{path.relative_to(ROOT)}: no figures named {name!r} (known: {', '.join(RENDER)}).")
        return match.group(1) + RENDER[name]() + match.group(4)
    return BLOCK.sub(block, text)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block is out of date")
    args = parser.parse_args()
    stale = []
    for path in PAGES:
        text = path.read_text()
        new = render_page(text, path)
        if new != text:
            stale.append(path.relative_to(ROOT))
            if not args.check:
                path.write_text(new)
    if args.check and stale:
        sys.exit(f"figures out of date in {', '.join(map(str, stale))}: run `make figures`.")
    print(("out of date: " if args.check else "rewritten: ") + (", ".join(map(str, stale)) or "none"))


if __name__ == "__main__":
    main()
