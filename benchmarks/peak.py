"""The device's dense matrix-product peak, measured: the denominator of every MFU figure of the GPU check.

    python benchmarks/peak.py [--size 8192] [--repeats 20]

Times `a @ b` of two size x size matrices (bf16 on CUDA, fp32 on the CPU) after a warm-up and prints TFLOP/s
(2 size^3 floating-point operations a product, median of the repeats).
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks._common import report  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    a, b = (torch.randn(args.size, args.size, device=device, dtype=dtype) for _ in range(2))
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - start)
    tflops = 2 * args.size ** 3 / statistics.median(times) / 1e12
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    print(f"{name}: {str(dtype).split('.')[-1]} {args.size}^3 matrix product {tflops:.1f} TFLOP/s")
    report("peak", device=name, dtype=str(dtype).split(".")[-1], size=args.size, tflops=round(tflops, 2))


if __name__ == "__main__":
    main()
