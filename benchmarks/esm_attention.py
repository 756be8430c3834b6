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

    python benchmarks/esm_attention.py [--repeats 3] [--batch 4] [--length 550] [--part 1,2] [--esm 6,320,20]
"""
import argparse
import contextlib
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks._common import alternating_times, median_time, real_structure_files, report  # noqa: E402
from esm_gearnet.data import Protein, ProteinBatch, constants, load_structures  # noqa: E402
from esm_gearnet.data.transforms import TruncateProtein  # noqa: E402
from esm_gearnet.models import ESM  # noqa: E402
from esm_gearnet.models.esm import MAX_RESIDUES, uses_varlen_kernel  # noqa: E402


def settings(cuda, architectures):
    """(device, architecture, autocast dtype) rows: the CPU's without CUDA, only CUDA's on a GPU machine."""
    if not cuda:
        return [("cpu", arch, None) for arch in architectures["cpu"]]
    return [("cuda", arch, dtype) for arch in architectures["cuda"] for dtype in (None, torch.bfloat16)]


def build(arch, attentions, device):
    models = {}
    for attention in attentions:
        torch.manual_seed(0)
        with torch.device(device):  # initialised where it runs, never on the CPU and moved
            models[attention] = ESM(pretrained=False, architecture=arch, attention=attention).to(device)
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
    for device, arch, dtype in settings(torch.cuda.is_available(), architectures):
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
    for device, arch, dtype in settings(torch.cuda.is_available(), architectures):
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
            print(f"{device} {label} {name} {row:>17s}: fwd {len(proteins) / fwd:8.2f} proteins/s "
                  f"{tokens / fwd:10.0f} tokens/s | fwd+bwd {len(proteins) / fwdbwd:8.2f} proteins/s "
                  f"{tokens / fwdbwd:10.0f} tokens/s")
            figures[attention] = {"fwd_proteins_per_s": round(len(proteins) / fwd, 2),
                                  "fwd_tokens_per_s": round(tokens / fwd),
                                  "fwd_bwd_proteins_per_s": round(len(proteins) / fwdbwd, 2),
                                  "fwd_bwd_tokens_per_s": round(tokens / fwdbwd)}
        speedup = (times["sdpa"][0] / times["varlen"][0], times["sdpa"][1] / times["varlen"][1])
        tolerance = 2e-2 if dtype else 1e-5
        print(f"{device} {label} {name}   unpadded / padded: fwd {speedup[0]:.2f}x  fwd+bwd {speedup[1]:.2f}x; "
              f"attention: {kernel}; feature rel. difference {difference:.1e} "
              f"({'ok' if difference < tolerance else 'ABOVE'} {tolerance:g})")
        report("esm_unpadded", device=device, precision=label, model=name, batch=args.batch,
               proteins=len(proteins), tokens=tokens, padded_tokens=padded_tokens, attention_kernel=kernel,
               padded=figures["sdpa"], unpadded=figures["varlen"], speedup_fwd=round(speedup[0], 2),
               mfu_fwd_bwd=mfu(arch, proteins, times, args.peak_tflops),
               speedup_fwd_bwd=round(speedup[1], 2), feature_relative_difference=difference,
               threads=torch.get_num_threads())


def mfu(arch, proteins, times, peak_tflops):
    """{path: model FLOP/s of forward + backward / the measured peak} or None without a peak. Model FLOPs per
    sequence of L tokens: 3 x (2 x 12 layers d^2 L + 4 layers d L^2), the padding credited nothing."""
    if not peak_tflops:
        return None
    layers, width, _ = arch
    flops = sum(3 * (2 * 12 * layers * width * width * (len(p) + 2) + 4 * layers * width * (len(p) + 2) ** 2)
                for p in proteins)
    return {path: round(flops / seconds[1] / (peak_tflops * 1e12), 3) for path, seconds in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=550, help="part 1: residues of every protein")
    parser.add_argument("--part", default="1,2", help="1: equal lengths, 2: padded vs unpadded on real lengths")
    parser.add_argument("--esm", default=None, help="part 2: one layers,width,heads instead of the defaults")
    parser.add_argument("--max-proteins", type=int, default=48, help="part 2: real structures used")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's measured matrix-product "
                        "peak (benchmarks/peak.py), for MFU")
    args = parser.parse_args()
    args.esm = tuple(int(x) for x in args.esm.split(",")) if args.esm else None
    parts = set(args.part.split(","))
    if "1" in parts:
        equal_lengths(args)
    if "2" in parts:
        real_lengths(args)


if __name__ == "__main__":
    main()
