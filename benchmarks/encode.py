"""Benchmark of the frozen feature encoders: items/s batched vs one item at a time, and peak memory.

Three encoders, each timed on CPU (and on CUDA when present) at several batch
sizes and one item at a time in the same run:

- ``minilm-text``: the bundled all-MiniLM-L6-v2 (real weights) on real item titles,
  from ``/work/shared/data/llmcdsr-food-kitchen/items.tsv`` when present, else the
  test fixture titles (repeated);
- ``clip-text`` and ``clip-image``: the ViT-B-32 open_clip architecture with RANDOM
  WEIGHTS, ARCHITECTURE COST ONLY (no pretrained CLIP weights can be fetched
  offline; a frozen network does the same arithmetic whatever its weight values),
  on the titles and on generated 500x500 product-like pictures (PIL-drawn, in
  memory: decoding image files is not included; preprocessing to 224x224 is).

Timing goes through the product's encoder classes (``encode_texts`` /
``encode_images``). Memory is the peak resident set size sampled during each
measurement (and ``torch.cuda.max_memory_allocated`` on CUDA). At the end, the time
to encode the 36,298 items of the Food-Kitchen release at the best batched rate.

Usage::

    .venv/bin/python benchmarks/encode.py              # about three minutes on 2 free CPU cores
    .venv/bin/python benchmarks/encode.py --precision fp32 bf16   # MiniLM in both, vectors compared
    .venv/bin/python benchmarks/encode.py --quick      # a smoke run
    .venv/bin/python benchmarks/encode.py --json out.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from cdsr_pipeline.features.encoders import (
    EncoderConfigError,
    EncoderSpec,
    OpenClipImageEncoder,
    OpenClipTextEncoder,
    load_text_encoder,
)

REPO = Path(__file__).resolve().parents[1]
RELEASE_ITEMS = Path("/work/shared/data/llmcdsr-food-kitchen/items.tsv")
FIXTURE_TITLES = REPO / "tests" / "fixtures" / "food_kitchen_titles.tsv"
FOOD_KITCHEN_ITEMS = 36_298
RANDOM_WEIGHTS = "random weights, architecture cost only"


@dataclass
class Measurement:
    encoder: str
    device: str
    mode: str  # "batched" or "one-by-one"
    batch_size: int
    items: int
    seconds: float
    peak_rss_mib: float
    rss_growth_mib: float
    peak_cuda_mib: float | None

    @property
    def items_per_s(self) -> float:
        return self.items / self.seconds


class PeakRss:
    """Samples this process's resident set size from /proc every few milliseconds."""

    def __init__(self) -> None:
        self._page = os.sysconf("SC_PAGE_SIZE")
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * self._page

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def measure(
    name: str, device: str, mode: str, batch_size: int, items: Sequence, run: Callable[[Sequence], object]
) -> Measurement:
    run(items[: min(len(items), max(batch_size, 2))])  # warm-up: allocator, kernels, lazy init
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with PeakRss() as rss:
        started = time.perf_counter()
        run(items)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    cuda_peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    result = Measurement(
        name,
        device,
        mode,
        batch_size,
        len(items),
        seconds,
        rss.peak / 2**20,
        (rss.peak - rss.start) / 2**20,
        cuda_peak,
    )
    print(
        f"  {name:<12} {device:<5} {mode:<10} batch {batch_size:>4}: {result.items_per_s:8.1f} items/s "
        f"({len(items)} in {seconds:.1f}s; peak RSS {result.peak_rss_mib:.0f} MiB, "
        f"+{result.rss_growth_mib:.0f} MiB)"
        + (f", CUDA peak {cuda_peak:.0f} MiB" if cuda_peak is not None else ""),
        flush=True,
    )
    return result


def load_titles(count: int) -> tuple[list[str], str]:
    if RELEASE_ITEMS.is_file():
        with RELEASE_ITEMS.open(encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
        titles = [row["title"] for row in rows if row["title"]]
        source = str(RELEASE_ITEMS)
    else:
        with FIXTURE_TITLES.open(encoding="utf-8") as handle:
            lines = [line for line in handle if not line.startswith("#")]
        titles = [row["title"] for row in csv.DictReader(lines, delimiter="\t")]
        source = f"{FIXTURE_TITLES} (repeated; the release is not on this machine)"
    rng = np.random.default_rng(0)
    picked = [titles[i % len(titles)] for i in rng.permutation(max(count, len(titles)))[:count]]
    return picked, source


def product_pictures(count: int, size: int = 500) -> list[Image.Image]:
    """Product-like pictures: a light background, a few coloured shapes (seeded)."""
    rng = np.random.default_rng(0)
    pictures = []
    for _ in range(count):
        image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(200, 256, 3)))
        draw = ImageDraw.Draw(image)
        for _ in range(4):
            x0, y0 = (int(v) for v in rng.integers(0, size // 2, 2))
            x1, y1 = x0 + int(rng.integers(60, size // 2)), y0 + int(rng.integers(60, size // 2))
            draw.rectangle((x0, y0, x1, y1), fill=tuple(int(v) for v in rng.integers(0, 200, 3)))
        pictures.append(image)
    return pictures


def random_vit_b32(device: str) -> tuple[OpenClipTextEncoder, OpenClipImageEncoder]:
    """ViT-B-32 with random weights, wrapped in the product's encoder classes; labelled as such."""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None, device=device)
    model.eval().requires_grad_(False)
    identity = {
        "backend": "open_clip",
        "model": "ViT-B-32",
        "weights": RANDOM_WEIGHTS,
        "dim": 512,
    }
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    text = OpenClipTextEncoder(model, tokenizer, {**identity, "modality": "text"}, device, 64)
    image = OpenClipImageEncoder(model, preprocess, {**identity, "modality": "image"}, device, 64)
    return text, image


def bench_encoder(
    name: str,
    device: str,
    encode: Callable[[Sequence, int], object],
    items: Sequence,
    batch_sizes: Sequence[int],
    one_by_one: int,
) -> list[Measurement]:
    """``encode(items, batch_size)`` batched at each size, then item by item (one call per item)."""
    results = [
        measure(name, device, "batched", size, items, lambda xs, size=size: encode(xs, size))
        for size in batch_sizes
    ]
    single = measure(
        name, device, "one-by-one", 1, items[:one_by_one], lambda xs: [encode([x], 1) for x in xs]
    )
    return [*results, single]


def print_share_of_peak(
    name: str,
    encode: Callable[[Sequence], object],
    items: Sequence,
    best: Measurement,
    device: str,
    inner: int,
    cols: int,
    precision: str = "fp32",
) -> None:
    """The best batched run's FLOP/s (counted by torch's FlopCounterMode over the same
    items) as a share of this machine's matrix-product peak, measured here at the
    encoder's hot shape (tokens of a pass x ``inner`` x ``cols``: the feed-forward)."""
    from torch.utils.flop_counter import FlopCounterMode

    from cdsr_pipeline.hardware import matmul_peak_gflops

    with FlopCounterMode(display=False) as counter:
        encode(items)
    gflop = counter.get_total_flops() / 1e9
    achieved = gflop / best.seconds
    rows = best.batch_size * 20  # about 20 tokens per title
    peaks = {
        label: matmul_peak_gflops(torch.device(device), dtype, rows, inner, cols)
        for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
    }
    print(
        f"  {name}: {gflop / len(items):.2f} GFLOP per item (FlopCounterMode), {achieved:.0f} GFLOP/s in the best "
        f"batched run ({precision}) = {achieved / peaks[precision]:.0%} of this machine's {precision} matrix-product "
        f"peak at {rows}x{inner}x{cols} (fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f}); "
        f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}",
        flush=True,
    )


def bench_device(device: str, args: argparse.Namespace, titles: list[str]) -> list[Measurement]:
    results: list[Measurement] = []
    vectors: dict[str, np.ndarray] = {}
    texts = titles[: args.text_items]
    for precision in args.precision:
        name = "minilm-text" if precision == "fp32" else f"minilm-text-{precision}"
        print(f"\n[{device}] {name} (all-MiniLM-L6-v2, real weights, {precision})", flush=True)
        try:
            minilm = load_text_encoder(EncoderSpec(backend="sentence_transformers", device=device, precision=precision))
        except EncoderConfigError as error:  # bf16 where the device has no native bf16
            print(f"  skipped: {error}", flush=True)
            continue
        runs = bench_encoder(
            name, device, lambda xs, size: minilm.encode_texts(xs, batch_size=size), texts, args.text_batches,
            args.one_by_one,
        )
        best = max((r for r in runs if r.mode == "batched"), key=lambda r: r.items_per_s)
        print_share_of_peak(
            name, lambda xs: minilm.encode_texts(xs, batch_size=best.batch_size), texts, best, device,
            inner=384, cols=1536, precision=precision,
        )
        vectors[precision] = minilm.encode_texts(texts, batch_size=best.batch_size)
        results += runs
    if len(vectors) == 2:
        a, b = vectors["fp32"], vectors["bf16"]
        cosines = (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        print(
            f"  bf16 against fp32, per title ({len(texts)}): cosine min {cosines.min():.5f}, "
            f"mean {cosines.mean():.5f} (kept: >= 0.999)",
            flush=True,
        )
    print(f"\n[{device}] clip-text, clip-image (ViT-B-32, {RANDOM_WEIGHTS})", flush=True)
    clip_text, clip_image = random_vit_b32(device)
    results += bench_encoder(
        "clip-text",
        device,
        lambda xs, size: clip_text.encode_texts(xs, batch_size=size),
        titles[: args.clip_items],
        args.clip_batches,
        args.one_by_one,
    )
    results += bench_encoder(
        "clip-image",
        device,
        lambda xs, size: clip_image.encode_images(xs, batch_size=size),
        product_pictures(args.clip_items),
        args.clip_batches,
        args.one_by_one,
    )
    return results


def summarize(results: list[Measurement]) -> list[dict]:
    summary = []
    print("\nsummary (best batched vs one-by-one; Food-Kitchen = 36,298 items)")
    for key in dict.fromkeys((r.encoder, r.device) for r in results):
        runs = [r for r in results if (r.encoder, r.device) == key]
        batched = max((r for r in runs if r.mode == "batched"), key=lambda r: r.items_per_s)
        single = next(r for r in runs if r.mode == "one-by-one")
        speedup = batched.items_per_s / single.items_per_s
        estimate_s = FOOD_KITCHEN_ITEMS / batched.items_per_s
        label = "" if key[0].startswith("minilm-text") else f"  [{RANDOM_WEIGHTS}]"
        print(
            f"  {key[0]:<12} {key[1]:<5} batch {batched.batch_size:>4}: {batched.items_per_s:8.1f} items/s, "
            f"{speedup:5.1f}x one-by-one ({single.items_per_s:.1f}/s); all of Food-Kitchen in "
            f"{estimate_s / 60:.1f} min{label}"
        )
        summary.append(
            {
                "encoder": key[0],
                "device": key[1],
                "best_batch_size": batched.batch_size,
                "batched_items_per_s": batched.items_per_s,
                "one_by_one_items_per_s": single.items_per_s,
                "speedup": speedup,
                "food_kitchen_estimate_s": estimate_s,
            }
        )
    return summary


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: CPU, and CUDA too when present",
    )
    parser.add_argument("--text-items", type=int, default=1024, help="titles per batched MiniLM run")
    parser.add_argument("--clip-items", type=int, default=64, help="titles/pictures per batched CLIP run")
    parser.add_argument("--one-by-one", type=int, default=32, help="items encoded one at a time")
    parser.add_argument("--text-batches", type=_ints, default=[16, 64, 256])
    parser.add_argument("--clip-batches", type=_ints, default=[16, 64])
    parser.add_argument(
        "--precision",
        nargs="+",
        choices=("fp32", "bf16"),
        default=["fp32"],
        help="MiniLM's precision(s); with both, the per-title cosine of the bf16 vectors against fp32's",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run with few items")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.text_items, args.clip_items, args.one_by_one = 64, 16, 8
        args.text_batches, args.clip_batches = [64], [16]
    return args


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",")]


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    devices = {
        "auto": ["cpu"] + (["cuda"] if torch.cuda.is_available() else []),
        "cpu": ["cpu"],
        "cuda": ["cuda"],
    }
    titles, source = load_titles(max(args.text_items, args.clip_items, args.one_by_one))
    print(
        f"encode benchmark: python {platform.python_version()}, torch {torch.__version__}, "
        f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
        f"CUDA {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'absent'}\n"
        f"titles from {source}\n"
        "(the machine may be shared with other work: figures can be pessimistic)"
    )
    results: list[Measurement] = []
    for device in devices[args.device]:
        results.extend(bench_device(device, args, titles))
    summary = summarize(results)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "titles": source,
                    "clip_weights": RANDOM_WEIGHTS,
                    "measurements": [asdict(r) | {"items_per_s": r.items_per_s} for r in results],
                    "summary": summary,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    sys.exit(main())
