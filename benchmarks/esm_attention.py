"""ESM-2 forward and forward+backward time: fair-esm's attention vs the SDPA fast path vs the unpadded path.

Two parts, same weights in every path:

1. Equal lengths (no padding anywhere): random-weight ESM-2 models of the real architectures (6 layers x 320,
   12 x 480; 33 x 1280 on CUDA) at batch 4 x 550 random residues; fair-esm attention, SDPA, and unpadded
   (`attention: varlen`). fp32 on CPU, fp32 and bf16 autocast on CUDA. Median of repeats after warm-up.
2. Padded vs unpadded on real lengths: the real structures of ../shared/data cropped to 550 residues (as the
   EC transform does), one pass over them in random batches of --batch (no length buckets); SDPA on the padded
   batch vs `attention: varlen` on the packed one. Prints proteins/s and tokens/s (real tokens: residues plus
   <cls>/<eos>, the same count for both paths) for fwd and fwd+bwd side by side, the padded/real token ratio,
   and the relative difference of the residue features (fp32: 1e-5; bf16: 2e-2 as benchmarks/train_step.py).
   The two paths are timed in alternation (medians of --repeats rounds after a warm-up round).
   On CPU, and in fp32 on CUDA, the unpadded path runs its reference attention (one SDPA per sequence); under
   bf16 on CUDA it runs FlashAttention's variable-length kernel (torch.nn.attention.varlen.varlen_attn).
   Also the model FLOPs utilisation of each path (benchmarks/esm_flops.py over the real tokens, against the
   matrix-product peak: --peak-tflops, or measured here with benchmarks/peak.py).

One device per run (--device, default cuda when present): on a GPU no CPU row is run. Models are built on the
device (random initialisation there, never on the CPU and then moved).

    python benchmarks/esm_attention.py [--repeats 3] [--batch 4] [--length 550] [--part 1,2] [--esm 6,320,20]
                                       [--device cpu|cuda] [--precision fp32,bf16] [--peak-tflops 0]
"""
import argparse
import contextlib
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks._common import alternating_times, median_time, real_structure_files, report  # noqa: E402
from benchmarks.esm_flops import esm_flops  # noqa: E402
from benchmarks.peak import peak_tflops  # noqa: E402
from esm_gearnet.data import Protein, ProteinBatch, constants, load_structures  # noqa: E402
from esm_gearnet.data.transforms import TruncateProtein  # noqa: E402
from esm_gearnet.models import ESM  # noqa: E402
from esm_gearnet.models.esm import MAX_RESIDUES, uses_varlen_kernel  # noqa: E402


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def settings(args, architectures):
    """(device, architecture, autocast dtype or None) of every row: the one device's architectures x precisions."""
    return [(args.device, arch, PRECISIONS[precision]) for arch in architectures[args.device]
            for precision in args.precision]


def build(arch, attentions, device):
    """One model per attention path, the same weights in each, built on the device."""
    models = {}
    for attention in attentions:
        torch.manual_seed(0)
        with torch.device(device):
            models[attention] = ESM(pretrained=False, architecture=arch, attention=attention)
    return models


def timers(model, batches, device, dtype):
    """(forward, forward+backward) closures over all `batches`."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def precision():
        return torch.autocast(device, dtype=dtype) if dtype else contextlib.nullcontext()

    def forward():
        with torch.no_grad(), precision():
            for batch in batches:
                model(batch)
        sync()

    def forward_backward():
        for batch in batches:
            with precision():
                out = model(batch)["residue_feature"]
            out.float().sum().backward()
            model.zero_grad(set_to_none=True)
        sync()

    return forward, forward_backward


def interleaved_medians(closures, repeats):
    """name -> (median forward s, median forward+backward s), the paths timed in alternation (one warm-up
    each), so that a load change on a shared machine falls on both sides alike."""
    times = alternating_times([f for functions in closures.values() for f in functions], repeats, warmup=1)
    medians = iter(statistics.median(t) for t in times)
    return {name: (next(medians), next(medians)) for name in closures}


def equal_lengths(args):
    generator = torch.Generator().manual_seed(0)
    letters = constants.RESIDUE_LETTERS
    proteins = [Protein.from_sequence("".join(letters[i] for i in torch.randint(20, (args.length,), generator=generator)))
                for _ in range(args.batch)]
    architectures = {"cpu": [(6, 320, 20), (12, 480, 20)], "cuda": [(6, 320, 20), (12, 480, 20), (33, 1280, 20)]}
    for device, arch, dtype in settings(args, architectures):
        batch = ProteinBatch.pack(proteins).to(device)
        times = {}
        for attention, model in build(arch, ("esm", "sdpa", "varlen"), device).items():
            forward, forward_backward = timers(model, [batch], device, dtype)
            times[attention] = (median_time(forward, args.repeats), median_time(forward_backward, args.repeats))
        name = f"{arch[0]}L-{arch[1]}d"
        label = "bf16" if dtype else "fp32"
        for attention, (fwd, fwdbwd) in times.items():
            print(f"{device} {label} {name} {attention:>6s}: fwd {fwd:.3f} s  fwd+bwd {fwdbwd:.3f} s")
        report("esm", device=device, precision=label, model=name, batch=args.batch, length=args.length,
               fair_esm_fwd_s=round(times["esm"][0], 4), fair_esm_fwd_bwd_s=round(times["esm"][1], 4),
               sdpa_fwd_s=round(times["sdpa"][0], 4), sdpa_fwd_bwd_s=round(times["sdpa"][1], 4),
               varlen_fwd_s=round(times["varlen"][0], 4), varlen_fwd_bwd_s=round(times["varlen"][1], 4),
               speedup_fwd=round(times["esm"][0] / times["sdpa"][0], 2),
               speedup_fwd_bwd=round(times["esm"][1] / times["sdpa"][1], 2), threads=torch.get_num_threads())


def real_lengths(args):
    files = real_structure_files()[:args.max_proteins]
    proteins, _ = load_structures(files, workers=1, progress=False)
    crop = TruncateProtein(max_length=550)
    proteins = [crop.truncate(p) for p in proteins]
    order = torch.randperm(len(proteins), generator=torch.Generator().manual_seed(0)).tolist()
    groups = [[proteins[i] for i in order[s:s + args.batch]] for s in range(0, len(order), args.batch)]
    cpu_batches = [ProteinBatch.pack(group) for group in groups]
    residues = sum(len(p) for p in proteins)
    windows = sum((len(p) + MAX_RESIDUES - 1) // MAX_RESIDUES for p in proteins)
    tokens = residues + 2 * windows  # each window has its <cls> and <eos>
    padded_tokens = sum(len(b.num_residues) * (int(b.num_residues.max()) + 2) for b in cpu_batches)
    print(f"\npadded vs unpadded: {len(proteins)} real structures cropped to 550, {residues} residues, "
          f"random batches of {args.batch}; padded tokens / real tokens = {padded_tokens / tokens:.3f}")
    architectures = {"cpu": [args.esm] if args.esm else [(6, 320, 20), (12, 480, 20)],
                     "cuda": [args.esm] if args.esm else [(6, 320, 20), (33, 1280, 20)]}
    lengths = [min(len(p) - start, MAX_RESIDUES) + 2 for p in proteins for start in range(0, len(p), MAX_RESIDUES)]
    for device, arch, dtype in settings(args, architectures):
        peak = peak_tflops(device, dtype or torch.float32, args.peak_tflops)
        flops = esm_flops(arch, lengths)
        batches = [b.to(device) for b in cpu_batches]
        models = build(arch, ("sdpa", "varlen"), device)
        with torch.no_grad(), (torch.autocast(device, dtype=dtype) if dtype else contextlib.nullcontext()):
            a, b = (models[n](batches[0])["residue_feature"].float() for n in ("varlen", "sdpa"))
        difference = float((a - b).norm() / b.norm())
        head = torch.zeros(1, arch[2], arch[1] // arch[2], device=device, dtype=dtype or torch.float32)
        kernel = "varlen_attn (FlashAttention)" if uses_varlen_kernel(head) else "reference: SDPA per sequence"
        times = interleaved_medians({name: timers(model, batches, device, dtype) for name, model in models.items()},
                                    args.repeats)
        name = f"{arch[0]}L-{arch[1]}d"
        label = "bf16" if dtype else "fp32"
        figures = {}
        for attention, (fwd, fwdbwd) in times.items():
            row = "padded (sdpa)" if attention == "sdpa" else "unpadded (varlen)"
            mfu = (flops / fwd / (peak * 1e12), 3 * flops / fwdbwd / (peak * 1e12))
            print(f"{device} {label} {name} {row:>17s}: fwd {len(proteins) / fwd:8.2f} proteins/s "
                  f"{tokens / fwd:10.0f} tokens/s MFU {mfu[0]:.3f} | fwd+bwd {len(proteins) / fwdbwd:8.2f} "
                  f"proteins/s {tokens / fwdbwd:10.0f} tokens/s MFU {mfu[1]:.3f}")
            figures[attention] = {"fwd_proteins_per_s": round(len(proteins) / fwd, 2),
                                  "fwd_tokens_per_s": round(tokens / fwd), "fwd_mfu": round(mfu[0], 4),
                                  "fwd_bwd_proteins_per_s": round(len(proteins) / fwdbwd, 2),
                                  "fwd_bwd_tokens_per_s": round(tokens / fwdbwd), "fwd_bwd_mfu": round(mfu[1], 4)}
        speedup = (times["sdpa"][0] / times["varlen"][0], times["sdpa"][1] / times["varlen"][1])
        tolerance = 2e-2 if dtype else 1e-5
        print(f"{device} {label} {name}   unpadded / padded: fwd {speedup[0]:.2f}x  fwd+bwd {speedup[1]:.2f}x; "
              f"attention: {kernel}; feature rel. difference {difference:.1e} "
              f"({'ok' if difference < tolerance else 'ABOVE'} {tolerance:g})")
        report("esm_unpadded", device=device, precision=label, model=name, batch=args.batch,
               proteins=len(proteins), tokens=tokens, padded_tokens=padded_tokens, attention_kernel=kernel,
               padded=figures["sdpa"], unpadded=figures["varlen"], speedup_fwd=round(speedup[0], 2),
               speedup_fwd_bwd=round(speedup[1], 2), feature_relative_difference=difference,
               peak_tflops=round(peak, 3), threads=torch.get_num_threads())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=550, help="part 1: residues of every protein")
    parser.add_argument("--part", default="1,2", help="1: equal lengths, 2: padded vs unpadded on real lengths")
    parser.add_argument("--esm", default=None, help="part 2: one layers,width,heads instead of the defaults")
    parser.add_argument("--max-proteins", type=int, default=48, help="part 2: real structures used")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default=None,
                        help="comma-separated fp32, bf16 (autocast); default fp32 on the CPU, fp32,bf16 on CUDA")
    parser.add_argument("--peak-tflops", type=float, default=0.0,
                        help="the device's matrix-product peak in its own precision (bf16 on CUDA, fp32 on the "
                             "CPU), as the GPU check's peak step measured it; 0: measured here")
    args = parser.parse_args()
    args.esm = tuple(int(x) for x in args.esm.split(",")) if args.esm else None
    args.precision = (args.precision or ("fp32,bf16" if args.device == "cuda" else "fp32")).split(",")
    if set(args.precision) - set(PRECISIONS):
        parser.error(f"--precision: choose from {', '.join(PRECISIONS)}.")
    parts = set(args.part.split(","))
    if "1" in parts:
        equal_lengths(args)
    if "2" in parts:
        real_lengths(args)


if __name__ == "__main__":
    main()
