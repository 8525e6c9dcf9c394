"""What the machine's arithmetic can do: the precision a stage runs in.

``precision: auto`` picks bf16 where the device multiplies it faster than fp32: CUDA
with bf16, CPUs with AMX, and AMD CPUs with AVX-512 BF16 (Zen 4 and later). An Intel
CPU with AVX-512 BF16 but no AMX multiplies bf16 natively yet slower than fp32 (measured
on a 2-core Xeon, family 6 model 207, AMX not exposed: 141-164 GFLOP/s in bf16 against
217-281 in fp32 at the training's and the encoders' shapes), so ``auto`` keeps fp32
there and ``bf16`` stays available on request. Without any of these torch emulates bf16
products, and ``bf16`` is refused.
"""

from __future__ import annotations

import contextlib
import functools
import platform
import time
from pathlib import Path

import torch

_NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


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


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX-512 BF16 or AMX, from
    /proc/cpuinfo). Without them torch emulates bf16 products, slower than fp32."""
    flags = (_cpuinfo("flags") or "").split()
    return any(flag in flags for flag in _NATIVE_BF16_CPU_FLAGS)


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 faster than fp32: AMX, or AVX-512 BF16 on AMD
    (measured 2-2.5x fp32 on a 2-core EPYC). Intel's AVX-512 BF16 without AMX ran at
    0.55x fp32 (module docstring). Flags, not a timing: the choice, and with it a run's
    identity, must not depend on how loaded the machine is when it is made."""
    flags = (_cpuinfo("flags") or "").split()
    return "amx_bf16" in flags or ("avx512_bf16" in flags and _cpuinfo("vendor_id") == "AuthenticAMD")


def resolve_precision(precision: str, device: torch.device) -> str:
    """``fp32`` or ``bf16``: what ``precision`` (``auto``/``fp32``/``bf16``) means on ``device``.

    ``auto``: bf16 where it is faster than fp32 (:func:`cpu_has_fast_bf16`, CUDA with
    bf16), else fp32. ``bf16``: wherever the device multiplies bf16 natively."""
    if precision == "fp32":
        return "fp32"
    if device.type == "cuda":
        fast = native = torch.cuda.is_bf16_supported()
    else:
        fast = device.type == "cpu" and cpu_has_fast_bf16()
        native = fast or (device.type == "cpu" and cpu_has_native_bf16())
    if precision == "bf16":
        if not native:
            raise ValueError(f"precision bf16: {device} has no native bf16 arithmetic (use precision auto or fp32)")
        return "bf16"
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
