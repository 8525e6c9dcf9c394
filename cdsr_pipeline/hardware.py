"""What the machine's arithmetic can do: the precision a stage runs in.

bf16 is used where the device multiplies it natively (CUDA with bf16; CPUs with
AVX-512 BF16 or AMX); elsewhere torch emulates bf16 products, slower than fp32.
"""

from __future__ import annotations

import contextlib
import functools
import platform
import time
from pathlib import Path

import torch

_FAST_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def _cpuinfo(field: str) -> str | None:
    """The value of ``field`` for the first CPU in /proc/cpuinfo (None where there is none)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == field:
                return value.strip()
    return None


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo, else what the platform module says)."""
    return _cpuinfo("model name") or platform.processor() or platform.machine() or "unknown"


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX-512 BF16 or AMX, from
    /proc/cpuinfo). Without them torch emulates bf16 products, slower than fp32."""
    flags = (_cpuinfo("flags") or "").split()
    return any(flag in flags for flag in _FAST_BF16_CPU_FLAGS)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``fp32`` or ``bf16``: what ``precision`` (``auto``/``fp32``/``bf16``) means on ``device``."""
    if precision == "fp32":
        return "fp32"
    fast = torch.cuda.is_bf16_supported() if device.type == "cuda" else device.type == "cpu" and cpu_has_fast_bf16()
    if precision == "bf16" and not fast:
        raise ValueError(f"precision bf16: {device} has no native bf16 arithmetic (use precision auto or fp32)")
    return "bf16" if fast else "fp32"


def matmul_peak_gflops(device: torch.device, dtype: torch.dtype, rows: int, inner: int, cols: int, repeats: int = 4) -> float:
    """GFLOP/s of this machine's best ``[rows, inner] x [inner, cols]`` matrix product in
    ``dtype`` with the current threads: the limit a stage's hot loop is compared with
    (the benchmarks measure it in their own process, at their own shapes). Each of the
    ``repeats`` samples times enough products to last a few milliseconds, so that small
    shapes are not timed by the clock's resolution; the best sample counts."""
    a = torch.randn(rows, inner, device=device, dtype=dtype)
    b = torch.randn(cols, inner, device=device, dtype=dtype)
    out = torch.empty(rows, cols, device=device, dtype=dtype)

    def sample(products: int) -> float:
        started = time.perf_counter()
        for _ in range(products):
            torch.mm(a, b.t(), out=out)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - started) / products

    products = 1
    while sample(products) * products < 0.005 and products < 1 << 14:  # the first also pages the output in
        products *= 4
    best = min(sample(products) for _ in range(repeats))
    return 2 * rows * inner * cols / best / 1e9
