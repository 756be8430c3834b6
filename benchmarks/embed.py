"""Frozen ESM-2 embedding throughput through `embed`'s own code, side by side with fair-esm and transformers.

    python benchmarks/embed.py [--sizes 8M,35M] [--proteins 32] [--rounds 2] [--precision fp32|bf16]
                               [--peak-tflops X] [--device cpu|cuda]

For each ESM-2 size, one random `transformers.EsmModel` of the real architecture is saved in the Hugging Face
format; the same weights then run in three engines on the same proteins and batches:

  embed         `commands.embed.embed_proteins` on `ESM(path=folder, attention="varlen")`, frozen: the
                `esm-gearnet embed` path (unpadded tokens, mean over residues)
  fair-esm      fair-esm's `ESM2` forward on padded tokens, mean over the residues' rows
  transformers  `EsmModel(attn_implementation="sdpa")`, mean of `last_hidden_state` over the residues' rows

The proteins are `--proteins` real structures of ../shared/data spread evenly over their lengths (cropped to
1022 residues, ESM-2's window), in the batches `embed` makes (`length_batches`: sorted by length, at most
`--max-residues` residues or 32 proteins a batch); every engine gets those batches. The engines are timed in
turn over `--rounds` rounds after a warm-up round (a change of the machine's load falls on all alike; median
per engine). The protein embeddings of each engine must equal embed's (relative difference printed). Figures:
proteins/s, tokens/s (residues + <cls> and <eos>), and the model FLOP/s as a fraction of the matrix-product peak
(`--peak-tflops`, else measured here: benchmarks/peak.py's product at 2048 on the CPU, 8192 bf16 on CUDA).
Model FLOPs of a sequence of T tokens: 2 x 12 layers d^2 T + 4 layers d T^2.
"""
import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks._common import alternating_times, real_structure_files, report  # noqa: E402
try:
    from esm_gearnet.commands.embed import embed_proteins  # noqa: E402
    from esm_gearnet.commands.inputs import length_batches  # noqa: E402
except ImportError:  # a checkout from before the commands package (for figures before and after)
    from esm_gearnet.inference import embed_proteins, length_batches  # noqa: E402
from esm_gearnet.data import ProteinBatch, load_structures  # noqa: E402
from esm_gearnet.data.transforms import TruncateProtein  # noqa: E402
from esm_gearnet.models import ESM  # noqa: E402
from esm_gearnet.models.esm import MAX_RESIDUES  # noqa: E402

SIZES = {"tiny": (2, 64, 4), "8M": (6, 320, 20), "35M": (12, 480, 20), "150M": (30, 640, 20),
         "650M": (33, 1280, 20)}


def spread_proteins(count):
    """`count` real proteins spread evenly over the lengths of ../shared/data's structures, cropped to 1022."""
    proteins, _ = load_structures(real_structure_files(), workers=1, progress=False)
    proteins = sorted(proteins, key=len)
    picks = sorted({round(i * (len(proteins) - 1) / max(count - 1, 1)) for i in range(count)})
    crop = TruncateProtein(max_length=MAX_RESIDUES)
    return [crop.truncate(proteins[i]) for i in picks]


def measured_peak(device):
    size = 8192 if device.type == "cuda" else 2048
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - start)
    return 2 * size ** 3 / statistics.median(times) / 1e12


def engines(folder, proteins, groups, device, precision, max_residues):
    """{engine: () -> [P, D] protein embeddings in the order of `proteins`}."""
    from transformers import EsmModel

    ours = ESM(path=str(folder), attention="varlen")
    ours.freeze("sequence_model")
    ours.to(device).eval()
    fair = ours.model  # fair-esm's ESM2 with the same weights; its own forward below
    hf = EsmModel.from_pretrained(str(folder), attn_implementation="sdpa", add_pooling_layer=False).to(device).eval()
    alphabet = ours.alphabet
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16" \
        else contextlib.nullcontext
    padded = []
    for group in groups:  # the same tokens for fair-esm and transformers: embed's own tokenizer, padded
        batch = ProteinBatch.pack([proteins[i] for i in group])
        tokens, window, column = ours.tokenize(batch)
        padded.append((tokens.to(device), window.to(device), column.to(device), batch.residue2graph.to(device),
                       batch.num_residues.to(device)))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run_embed():
        with autocast():
            embedding, _ = embed_proteins(ours, proteins, device=device, max_residues=max_residues)
        sync()
        return embedding

    def padded_engine(forward):
        def run():
            out = [None] * len(proteins)
            with torch.no_grad(), autocast():
                for group, (tokens, window, column, residue2graph, sizes) in zip(groups, padded):
                    hidden = forward(tokens)[window, column].float()  # [N, D] the residues' rows
                    mean = torch.zeros(len(sizes), hidden.shape[-1], device=device).index_add_(
                        0, residue2graph, hidden) / sizes[:, None]
                    for k, i in enumerate(group):
                        out[i] = mean[k]
            sync()
            return torch.stack(out).cpu()
        return run

    layers = fair.num_layers
    return {"embed": run_embed,
            "fair-esm": padded_engine(lambda t: fair(t, repr_layers=[layers])["representations"][layers]),
            "transformers": padded_engine(lambda t: hf(input_ids=t, attention_mask=t.ne(alphabet.padding_idx))
                                          .last_hidden_state)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="8M,35M", help="comma-separated: " + ", ".join(SIZES))
    parser.add_argument("--proteins", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-residues", type=int, default=4096, help="embed's batch size in residues")
    parser.add_argument("--device", default=None, help="cuda when present, else cpu")
    parser.add_argument("--precision", default=None, help="fp32 (default on the CPU) or bf16 (default on CUDA)")
    parser.add_argument("--peak-tflops", type=float, default=None)
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    if device.type == "cpu":
        torch.set_num_threads(2)
    try:
        from transformers import EsmConfig, EsmModel
    except ImportError:
        raise SystemExit("benchmarks/embed.py compares with transformers: pip install transformers") from None
    proteins = spread_proteins(args.proteins)
    lengths = [len(p) for p in proteins]
    groups = list(length_batches(lengths, args.max_residues))
    tokens = sum(n + 2 for n in lengths)
    peak = args.peak_tflops or measured_peak(device)
    print(f"{len(proteins)} real proteins, {min(lengths)}-{max(lengths)} residues, {tokens} tokens, "
          f"{len(groups)} batches (embed's own); {device}, {precision}, "
          f"{torch.get_num_threads() if device.type == 'cpu' else 'GPU'} threads; peak {peak:.2f} TFLOP/s")
    results = {}
    for size in args.sizes.split(","):
        layers, width, heads = SIZES[size]
        config = EsmConfig(vocab_size=33, hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                           intermediate_size=4 * width, position_embedding_type="rotary", token_dropout=True,
                           pad_token_id=1, mask_token_id=32, max_position_embeddings=1026, layer_norm_eps=1e-5,
                           emb_layer_norm_before=False, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        with tempfile.TemporaryDirectory() as folder:
            torch.manual_seed(0)
            with torch.device(device):  # initialised where it runs
                EsmModel(config, add_pooling_layer=False).save_pretrained(folder)
            runs = engines(folder, proteins, groups, device, precision, args.max_residues)
            outputs = {name: run() for name, run in runs.items()}
            times = alternating_times(list(runs.values()), args.rounds, warmup=1)
        flops = sum(2 * 12 * layers * width * width * (n + 2) + 4 * layers * width * (n + 2) ** 2 for n in lengths)
        row = {}
        for (name, run), seconds in zip(runs.items(), times):
            median = statistics.median(seconds)
            difference = float((outputs[name] - outputs["embed"]).norm() / outputs["embed"].norm())
            row[name] = {"proteins_per_s": round(len(proteins) / median, 2), "tokens_per_s": round(tokens / median),
                         "peak_fraction": round(flops / median / (peak * 1e12), 4),
                         "relative_difference_to_embed": float(f"{difference:.2e}")}
        for name, figures in row.items():
            lead = row["embed"]["proteins_per_s"] / figures["proteins_per_s"]
            print(f"ESM-2 {size:>4} {name:>12}: {figures['proteins_per_s']:8.2f} proteins/s "
                  f"{figures['tokens_per_s']:9d} tokens/s  {100 * figures['peak_fraction']:5.1f}% of peak  "
                  f"embed {lead:.2f}x  (embeddings differ from embed's by {figures['relative_difference_to_embed']:.1e})")
        results[size] = row
    report("embed", device=str(device), precision=precision, proteins=len(proteins), tokens=tokens,
           peak_tflops=round(peak, 2), sizes=results)


if __name__ == "__main__":
    main()
