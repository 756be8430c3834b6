"""The device's dense matrix-product peak, measured: the denominator of every MFU figure of the GPU check.

    python benchmarks/peak.py [--device cuda|cpu] [--size 8192] [--repeats 20]

Times `a @ b` of two size x size matrices (bf16 on CUDA, fp32 on the CPU) after a warm-up and prints TFLOP/s
(2 size^3 floating-point operations a product, median of the repeats). The size defaults to 8192 on CUDA and
2048 on the CPU (where one 8192^3 product takes seconds).
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks._common import report  # noqa: E402


def device_dtype(device) -> torch.dtype:
    """The precision a device's peak is stated in: bf16 on CUDA, fp32 on the CPU."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def default_size(device) -> int:
    return 8192 if torch.device(device).type == "cuda" else 2048


def matmul_tflops(device, dtype=None, size=None, repeats=20) -> float:
    """Median TFLOP/s of a size^3 matrix product on `device` in `dtype` (default: `device_dtype`)."""
    device = torch.device(device)
    dtype = dtype or device_dtype(device)
    size = size or default_size(device)
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - start)
    return 2 * size ** 3 / statistics.median(times) / 1e12


def peak_tflops(device, dtype, given: float = 0.0) -> float:
    """The peak an MFU figure of `dtype` on `device` is divided by: `given` (the GPU check's peak step measured
    it) when it is in the device's own precision (`device_dtype`), else measured here."""
    if given > 0 and dtype == device_dtype(device):
        return given
    repeats = 20 if torch.device(device).type == "cuda" else 5
    return matmul_tflops(device, dtype, repeats=repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype, size = device_dtype(device), args.size or default_size(device)
    tflops = matmul_tflops(device, dtype, size, args.repeats)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    precision = str(dtype).split(".")[-1]
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(f"{name}{threads}: {precision} {size}^3 matrix product {tflops:.4g} TFLOP/s")
    report("peak", device=name, dtype=precision, size=size, tflops=float(f"{tflops:.4g}"))


if __name__ == "__main__":
    main()
