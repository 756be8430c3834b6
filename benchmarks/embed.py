"""Frozen ESM-2 embedding throughput: `embed`'s own code path against fair-esm and transformers, on the same
proteins with the same weights.

For each size (ESM-2 8M, 35M, 150M, 650M: the real architectures, random weights) one fair-esm ESM2 module is
initialised on the device and its weights are copied into every engine:

    esm_gearnet varlen   `esm_gearnet.commands.embed.embed_proteins`, what `esm-gearnet embed` runs (batches by
                         length, packing, the encoder without autograd, its mean readout, results brought to the
                         CPU), with an `ESM(attention="varlen")` encoder: the unpadded path
    esm_gearnet sdpa     the same with `attention: sdpa` (padded batches; the default of configs)
    fair-esm             fair-esm's forward on its batch converter's padded tokens, the mean over each protein's
                         residues of the last layer (its extract.py `--include mean`)
    transformers sdpa    `transformers.EsmModel` (attn_implementation "sdpa") on the same tokens with their
                         attention mask, the same mean

Proteins: --proteins real structures of ../shared/data spread evenly over the range of lengths, sorted by length
and cut into batches of --batch; every engine gets the same batches (embed_proteins is called once a batch).
Every engine's embeddings are checked against the first's (largest relative difference over the proteins;
fp32 below 1e-5, bf16 below 2e-2) and the figure printed. The engines alternate within each round, after a
warm-up round; each figure is the median over --rounds. Printed: proteins/s, tokens/s (residues plus <cls> and
<eos>), and the fraction of the matrix-product peak (forward FLOPs of benchmarks/esm_flops.py over the time,
against the peak of the same precision on the same device, measured in this run by benchmarks/peak.py, or
--peak-tflops for the device's own precision as the GPU check measured it). --precision bf16 runs each engine
under bf16 autocast (`embed` itself runs in fp32).

    python benchmarks/embed.py [--sizes 8M,35M] [--device cpu|cuda] [--precision fp32[,bf16]] [--proteins 32]
                               [--batch 8] [--rounds 2]
"""
import argparse
import contextlib
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks._common import alternating_times, real_structure_files, report  # noqa: E402
from benchmarks.esm_flops import esm_flops  # noqa: E402
from benchmarks.peak import peak_tflops  # noqa: E402
from esm_gearnet.commands.embed import embed_proteins  # noqa: E402
from esm_gearnet.data import load_structures  # noqa: E402
from esm_gearnet.models import ESM  # noqa: E402
from esm_gearnet.models.esm import ARCHITECTURES, MAX_RESIDUES, build_esm2  # noqa: E402
from esm_gearnet.models.esm.hugging_face import HF_LAYER_NAMES  # noqa: E402

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOLERANCE = {"fp32": 1e-5, "bf16": 2e-2}


def spread_by_length(count):
    """`count` real structures (at most 1022 residues: one ESM window each) spread evenly over the lengths,
    sorted by length."""
    proteins, _ = load_structures(real_structure_files(), workers=1, progress=False)
    proteins = sorted((p for p in proteins if len(p) <= MAX_RESIDUES), key=len)
    if count >= len(proteins):
        return proteins
    if count == 1:
        return [proteins[len(proteins) // 2]]
    return [proteins[round(i * (len(proteins) - 1) / (count - 1))] for i in range(count)]


def hugging_face_state(fair):
    """fair-esm ESM2 state_dict renamed onto transformers' EsmModel (the inverse of `hugging_face.to_fair_esm`)."""
    state = fair.state_dict()
    out = {"embeddings.word_embeddings.weight": state["embed_tokens.weight"],
           "rotary_embeddings.inv_freq": state["layers.0.self_attn.rot_emb.inv_freq"]}
    for p in ("weight", "bias"):
        out[f"encoder.emb_layer_norm_after.{p}"] = state[f"emb_layer_norm_after.{p}"]
        out[f"contact_head.regression.{p}"] = state[f"contact_head.regression.{p}"]
        for i in range(fair.num_layers):
            for fair_name, hf_name in HF_LAYER_NAMES.items():
                out[f"encoder.layer.{i}.{hf_name}.{p}"] = state[f"layers.{i}.{fair_name}.{p}"]
    return out


def mean_over_residues(hidden, lengths):
    """[B, D]: each row's mean over its residues (positions 1..n, after <cls>) of hidden [B, T, D]."""
    return torch.stack([hidden[b, 1:n + 1].float().mean(0) for b, n in enumerate(lengths)])


def architecture(size):
    """(name, (layers, width, heads)) of `8M`, `35M`, ... (ESM-2's) or `LxWxH` (a small one for rehearsals)."""
    if f"ESM-2-{size}" in ARCHITECTURES:
        return f"ESM-2-{size}", tuple(ARCHITECTURES[f"ESM-2-{size}"][1:])
    numbers = size.split("x")
    if len(numbers) != 3 or not all(n.isdigit() for n in numbers):
        raise ValueError(f"--sizes: {size!r} is neither 8M, 35M, 150M, 650M, 3B, 15B nor layers x width x heads "
                         "(e.g. 2x64x4).")
    return f"ESM-2 {size}", tuple(int(n) for n in numbers)


def engines(arch, device, batches):
    """name -> function embedding every batch ([P, D] on the CPU), one random weight set copied into each."""
    layers, width, heads = arch
    torch.manual_seed(0)
    with torch.device(device):  # initialised on the device, never on the CPU and moved
        fair, alphabet = build_esm2(layers, width, heads)
        ours = {attention: ESM(pretrained=False, architecture=arch, attention=attention)
                for attention in ("varlen", "sdpa")}
    fair.eval()
    for encoder in ours.values():
        encoder.model.load_state_dict(fair.state_dict())
        encoder.eval()
    convert = alphabet.get_batch_converter()

    def ours_fn(encoder):
        def run():
            return torch.cat([embed_proteins(encoder, batch, device=device, max_residues=10 ** 9)[0]
                              for batch in batches])
        return run

    def padded_fn(forward):
        def run():
            out = []
            with torch.no_grad():
                for batch in batches:
                    _, _, tokens = convert([(p.name, p.sequence) for p in batch])
                    tokens = tokens.to(device)
                    out.append(mean_over_residues(forward(tokens), [len(p) for p in batch]).cpu())
            return torch.cat(out)
        return run

    fns = {"esm_gearnet varlen": ours_fn(ours["varlen"]), "esm_gearnet sdpa": ours_fn(ours["sdpa"]),
           "fair-esm": padded_fn(lambda tokens: fair(tokens, repr_layers=[layers])["representations"][layers])}
    try:
        from transformers import EsmConfig, EsmModel
    except ImportError:
        print("transformers is not installed: its engine is left out (pip install transformers)")
        return fns
    config = EsmConfig(vocab_size=len(alphabet.all_toks), pad_token_id=alphabet.padding_idx,
                       mask_token_id=alphabet.mask_idx, hidden_size=width, num_hidden_layers=layers,
                       num_attention_heads=heads, intermediate_size=4 * width, position_embedding_type="rotary",
                       token_dropout=True, emb_layer_norm_before=False, layer_norm_eps=1e-5,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=1026,
                       attn_implementation="sdpa")
    with torch.device(device):
        hf = EsmModel(config, add_pooling_layer=False)
    hf.load_state_dict(hugging_face_state(fair), strict=True)
    hf.eval()
    pad = alphabet.padding_idx
    fns["transformers sdpa"] = padded_fn(
        lambda tokens: hf(input_ids=tokens, attention_mask=(tokens != pad).long()).last_hidden_state)
    return fns


def relative_difference(a, b):
    """Largest over the proteins of |a - b| / |b| (rows of [P, D])."""
    return float(((a - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-30)).max())


def measure(size, precision, device, proteins, args):
    size, (layers, width, heads) = architecture(size)
    batches = [proteins[i:i + args.batch] for i in range(0, len(proteins), args.batch)]
    lengths = [len(p) + 2 for p in proteins]  # tokens: <cls> residues <eos>
    tokens = sum(lengths)
    dtype = PRECISIONS[precision]
    peak = peak_tflops(device, dtype, args.peak_tflops)
    flops = esm_flops((layers, width, heads), lengths)
    fns = engines((layers, width, heads), device, batches)
    autocast = (torch.autocast(device.type, dtype=dtype) if precision != "fp32" else contextlib.nullcontext())

    def under_autocast(fn):
        def run():
            with autocast:
                return fn()
        return run

    runs = {name: under_autocast(fn) for name, fn in fns.items()}
    outputs = {name: run() for name, run in runs.items()}
    first = next(iter(outputs))
    differences = {name: relative_difference(out, outputs[first]) for name, out in outputs.items() if name != first}
    times = alternating_times(list(runs.values()), args.rounds, warmup=1)
    seconds = {name: statistics.median(t) for name, t in zip(runs, times)}
    tolerance = TOLERANCE[precision]
    check = "ok" if max(differences.values(), default=0) < tolerance else f"ABOVE {tolerance:g}"
    print(f"\n{size} ({layers} x {width}, {heads} heads), {precision}, {device}: {len(proteins)} proteins "
          f"({min(lengths) - 2}-{max(lengths) - 2} residues), {tokens} tokens, batches of {args.batch} sorted by "
          f"length; {args.rounds} rounds; peak {peak:.3g} TFLOP/s")
    print("outputs vs " + first + ": " + ", ".join(f"{n} {d:.1e}" for n, d in differences.items())
          + f" ({check}, tolerance {tolerance:g})")
    reference = seconds.get("fair-esm")
    figures = {}
    for name, s in seconds.items():
        figures[name] = {"proteins_per_s": round(len(proteins) / s, 2), "tokens_per_s": round(tokens / s),
                         "mfu": round(flops / s / (peak * 1e12), 4), "seconds": round(s, 4)}
        versus = f"{reference / s:5.2f}x fair-esm" if reference else ""
        print(f"  {name:20s} {len(proteins) / s:9.2f} proteins/s {tokens / s:10.0f} tokens/s  "
              f"MFU {flops / s / (peak * 1e12):.3f}  {versus}")
    report("embed", model=size, precision=precision, device=str(device), proteins=len(proteins), tokens=tokens,
           batch=args.batch, rounds=args.rounds, peak_tflops=round(peak, 3), threads=torch.get_num_threads(),
           output_check=check, differences={n: float(f"{d:.2e}") for n, d in differences.items()}, **{
               name.replace(" ", "_").replace("-", "_"): f for name, f in figures.items()})


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="8M,35M",
                        help="comma-separated of 8M, 35M, 150M, 650M (ESM-2's), or LxWxH (a small one: 2x64x4)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="fp32", help="comma-separated of fp32, bf16 (autocast)")
    parser.add_argument("--proteins", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=0.0,
                        help="the device's matrix-product peak in its own precision (bf16 on CUDA, fp32 on the "
                             "CPU), as the GPU check's peak step measured it; 0: measured here")
    args = parser.parse_args()
    sizes, precisions = args.sizes.split(","), args.precision.split(",")
    try:
        [architecture(size) for size in sizes]
    except ValueError as error:
        parser.error(str(error))
    if set(precisions) - set(PRECISIONS):
        parser.error(f"--precision: choose from fp32, bf16 (got {args.precision!r}).")
    device = torch.device(args.device)
    proteins = spread_by_length(args.proteins)
    print(f"embedding {len(proteins)} real proteins on {device} ({torch.get_num_threads()} threads)")
    for size in sizes:
        for precision in precisions:
            measure(size, precision, device, proteins, args)


if __name__ == "__main__":
    main()
