"""Start-up of a pretrained ESM-2: `ESM(path, model)` built from its weights, against reading them whole.

    python benchmarks/startup.py [--sizes 150M,650M] [--formats fair-esm,hf] [--repeats 2] [--compare OTHER_TREE]

For each size and format it writes the weights (random, fp32, into a temporary folder that is removed after;
650M needs 2.6 GB of disk and is skipped with a sentence where there is less): `fair-esm`, one `.pt` file in
fair-esm's official layout; `hf`, a Hugging Face folder (config.json + model.safetensors, `EsmModel`'s names).
Then it measures, each in a fresh process, best of `--repeats` with a warm page cache:

  read       the weights read whole: `torch.load(file, map_location="cpu")` (hf: safetensors' `load` of the
             file's bytes)
  build      `ESM(path=folder, model=stem)` (hf: `ESM(path=folder)`) of this tree
  before     the same with the package of OTHER_TREE (`--compare`: a checkout of another commit)

Each ends with one read of every memory page of the weights (a memory-mapped file is read when first used), so
the figures are those of weights ready in memory. Seconds and peak resident memory above the process's own after
its imports (`VmHWM` - `VmRSS`, GiB), then the ratios the goal is stated in: build time / read time (goal ≤ 1.5)
and build peak / the weights' size (goal ≤ 1.2).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._common import report  # noqa: E402

SIZES = {"8M": "ESM-2-8M", "35M": "ESM-2-35M", "150M": "ESM-2-150M", "650M": "ESM-2-650M"}


# one measurement, in a fresh process of the tree measured (`python -c`, run in that tree: its package is imported)
WORKER = """
import json, sys, time
from pathlib import Path

import torch


def memory(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024


mode, form, folder, stem = sys.argv[1:]
from safetensors.torch import load

from esm_gearnet.models import ESM

torch.set_num_threads(2)
base = memory("VmRSS")
start = time.perf_counter()
if mode == "read" and form == "hf":
    weights = load((Path(folder) / "model.safetensors").read_bytes())  # whole, as torch.load reads
elif mode == "read":
    weights = torch.load(Path(folder) / (stem + ".pt"), map_location="cpu", weights_only=False)["model"]
else:
    weights = (ESM(path=folder) if form == "hf" else ESM(path=folder, model=stem)).state_dict()
for value in weights.values():  # every page in memory
    if value.numel():
        float(value.reshape(-1)[::1024].float().sum())
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_bytes": memory("VmHWM") - base, "file": sys.modules["esm_gearnet"].__file__}))
"""


def random_weights(name: str) -> dict:
    """{fair-esm name: tensor}: random parameters of `name`'s architecture (fp32) and its buffers (the rotary
    frequencies); the contact head left out, the tied `lm_head.weight` named once (as `embed_tokens.weight`)."""
    import torch

    from esm_gearnet.checkpoint import skipping_init
    from esm_gearnet.models.esm import ARCHITECTURES, build_esm2

    _, layers, dim, heads = ARCHITECTURES[name]
    with skipping_init():  # filled below, faster than the modules' own initialisation
        model, _ = build_esm2(layers, dim, heads)
    generator = torch.Generator().manual_seed(0)
    parameters = dict(model.named_parameters())  # lm_head.weight is embed_tokens.weight: named once
    return {key: torch.randn(value.shape, generator=generator) * 0.02 if key in parameters else value
            for key, value in model.state_dict().items() if not key.startswith(("contact_head", "lm_head.weight"))}


def write_weights(folder: Path, name: str, form: str) -> tuple:
    """(stem, bytes of weights): `name`'s random weights as a fair-esm file or a Hugging Face folder."""
    import argparse as ap

    import torch

    from esm_gearnet.models.esm import ARCHITECTURES
    from esm_gearnet.models.esm.hugging_face import HF_LAYER_NAMES

    stem, layers, dim, heads = ARCHITECTURES[name]
    weights = random_weights(name)
    size = sum(value.numel() * value.element_size() for value in weights.values())
    if form == "fair-esm":
        state = {("encoder." if key.startswith("lm_head") else "encoder.sentence_encoder.") + key: value
                 for key, value in weights.items()}
        state["encoder.lm_head.weight"] = state["encoder.sentence_encoder.embed_tokens.weight"]  # tied
        cfg = ap.Namespace(encoder_layers=layers, encoder_embed_dim=dim, encoder_attention_heads=heads,
                           token_dropout=True)
        torch.save({"model": state, "cfg": {"model": cfg}}, folder / f"{stem}.pt")
        return stem, size
    from safetensors.torch import save_file

    names = {"embed_tokens.weight": "embeddings.word_embeddings.weight"}
    names.update({f"emb_layer_norm_after.{p}": f"encoder.emb_layer_norm_after.{p}" for p in ("weight", "bias")})
    names.update({f"layers.{i}.{fair}.{p}": f"encoder.layer.{i}.{hf}.{p}" for i in range(layers)
                  for fair, hf in HF_LAYER_NAMES.items() for p in ("weight", "bias")})
    names.update({key: key for key in weights if key.startswith("lm_head")})  # EsmForMaskedLM's head names
    save_file({names[key]: value for key, value in weights.items() if "rot_emb" not in key},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "model_type": "esm", "hidden_size": dim, "num_hidden_layers": layers, "num_attention_heads": heads,
        "intermediate_size": 4 * dim, "position_embedding_type": "rotary", "token_dropout": True,
        "vocab_size": 33, "pad_token_id": 1, "mask_token_id": 32, "layer_norm_eps": 1e-5,
        "emb_layer_norm_before": False, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}))
    return stem, size


def measure(mode: str, form: str, folder: Path, stem: str, tree: Path, repeats: int) -> dict:
    """Best seconds and peak over `repeats` fresh processes importing the package of `tree`."""
    runs = []
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "2"}
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", WORKER, mode, form, str(folder), stem], env=env, cwd=tree,
                             capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"{mode} ({form}) in {tree} failed:\n{out.stderr[-2000:]}")
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        assert runs[-1]["file"].startswith(str(tree)), f"measured {runs[-1]['file']}, not the tree {tree}"
    return {"seconds": min(r["seconds"] for r in runs), "peak_gib": min(r["peak_bytes"] for r in runs) / 2 ** 30}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="150M,650M", help="comma-separated: " + ", ".join(SIZES))
    parser.add_argument("--formats", default="fair-esm,hf", help="comma-separated: fair-esm, hf")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--compare", type=Path, default=None, help="another checkout, measured as `before`")
    args = parser.parse_args()
    from esm_gearnet.models.esm import ARCHITECTURES

    results = {}
    for size in args.sizes.split(","):
        name = SIZES[size]
        _, layers, dim, _ = ARCHITECTURES[name]
        needed = (12 * layers * dim * dim + 33 * dim) * 4 * 1.1  # the weights in fp32, with room
        for form in args.formats.split(","):
            folder = Path(tempfile.mkdtemp(prefix=f"startup-{size}-"))
            try:
                if shutil.disk_usage(folder).free < needed:
                    print(f"ESM-2 {size}: skipped, {needed / 2 ** 30:.1f} GiB of free disk needed in "
                          f"{folder.parent}")
                    break
                stem, weights = write_weights(folder, name, form)
                measure("read", form, folder, stem, ROOT, 1)  # warms the page cache
                row = {"weights_gib": weights / 2 ** 30,
                       "read": measure("read", form, folder, stem, ROOT, args.repeats),
                       "build": measure("build", form, folder, stem, ROOT, args.repeats)}
                if args.compare:
                    row["before"] = measure("build", form, folder, stem, args.compare.resolve(), args.repeats)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            for key in ("build", "before"):
                if key in row:
                    row[key]["time_vs_read"] = row[key]["seconds"] / row["read"]["seconds"]
                    row[key]["peak_vs_weights"] = row[key]["peak_gib"] / row["weights_gib"]
            results[f"{size} {form}"] = row
            print(f"ESM-2 {size}, {form} ({row['weights_gib']:.2f} GiB of weights): read {row['read']['seconds']:.2f}"
                  f" s, peak {row['read']['peak_gib']:.2f} GiB", flush=True)
            for key in ("build", "before"):
                if key in row:
                    r = row[key]
                    print(f"  {key:<7} {r['seconds']:6.2f} s ({r['time_vs_read']:.2f}x the read), peak "
                          f"{r['peak_gib']:.2f} GiB ({r['peak_vs_weights']:.2f}x the weights)", flush=True)
    report("startup", sizes=results, cpu_threads=2)


if __name__ == "__main__":
    main()
