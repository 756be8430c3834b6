"""ESM-2 forward and forward+backward time: fair-esm's attention vs the SDPA fast path, same weights.

Random-weight ESM-2 models of the real architectures (6 layers x 320, 12 x 480; 33 x 1280 on CUDA) at
batch 4 x 550 residues; fp32 on CPU, fp32 and bf16 autocast on CUDA. Median of repeats after warm-up.

    python benchmarks/esm_attention.py [--repeats 3] [--batch 4] [--length 550]
"""
import argparse
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks._common import median_time, report  # noqa: E402
from esm_gearnet.data import Protein, ProteinBatch, constants  # noqa: E402
from esm_gearnet.models import ESM  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=550)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    letters = constants.RESIDUE_LETTERS
    proteins = [Protein.from_sequence("".join(letters[i] for i in torch.randint(20, (args.length,), generator=generator)))
                for _ in range(args.batch)]
    settings = [("cpu", (6, 320, 20), None), ("cpu", (12, 480, 20), None)]
    if torch.cuda.is_available():
        settings += [("cuda", arch, dtype) for arch in [(6, 320, 20), (12, 480, 20), (33, 1280, 20)]
                     for dtype in (None, torch.bfloat16)]
    for device, arch, dtype in settings:
        batch = ProteinBatch.pack(proteins).to(device)
        models = {}
        for attention in ("esm", "sdpa"):
            torch.manual_seed(0)
            models[attention] = ESM(pretrained=False, architecture=arch, attention=attention).to(device)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        def precision():
            return torch.autocast(device, dtype=dtype) if dtype else contextlib.nullcontext()

        times = {}
        for attention, model in models.items():
            def forward():
                with torch.no_grad(), precision():
                    model(batch)
                sync()

            def forward_backward():
                with precision():
                    out = model(batch)["residue_feature"]
                out.float().sum().backward()
                model.zero_grad(set_to_none=True)
                sync()

            times[attention] = (median_time(forward, args.repeats), median_time(forward_backward, args.repeats))
        name = f"{arch[0]}L-{arch[1]}d"
        label = "bf16" if dtype else "fp32"
        for attention, (fwd, fwdbwd) in times.items():
            print(f"{device} {label} {name} {attention:>4s}: fwd {fwd:.3f} s  fwd+bwd {fwdbwd:.3f} s")
        report("esm", device=device, precision=label, model=name, batch=args.batch, length=args.length,
               fair_esm_fwd_s=round(times["esm"][0], 4), fair_esm_fwd_bwd_s=round(times["esm"][1], 4),
               sdpa_fwd_s=round(times["sdpa"][0], 4), sdpa_fwd_bwd_s=round(times["sdpa"][1], 4),
               speedup_fwd=round(times["esm"][0] / times["sdpa"][0], 2),
               speedup_fwd_bwd=round(times["esm"][1] / times["sdpa"][1], 2), threads=torch.get_num_threads())


if __name__ == "__main__":
    main()
