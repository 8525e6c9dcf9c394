"""Cut the bundled demo sample from the LLMCDSR Food-Kitchen release.

Source: ``../shared/data/llmcdsr-food-kitchen`` (Amazon Grocery & Gourmet Food and
Home & Kitchen, from the LLMCDSR release, xhran2010/LLMCDSR). How the sample is cut:
:mod:`cdsr_pipeline.data.sample`.

Usage: ``python scripts/make_demo_data.py [--source DIR] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import asdict, fields
from pathlib import Path

from cdsr_pipeline.data.sample import SampleSize, cut_llmcdsr_sample

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = ROOT.parent / "shared" / "data" / "llmcdsr-food-kitchen"
DEFAULT_OUT = ROOT / "cdsr_pipeline" / "demo_data" / "llmcdsr-food-kitchen-sample"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    for field in fields(SampleSize):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=int, default=field.default)
    args = parser.parse_args()
    size = SampleSize(**{f.name: getattr(args, f.name) for f in fields(SampleSize)})

    if args.out.exists():
        shutil.rmtree(args.out)
    counts = cut_llmcdsr_sample(args.source, args.out, size)
    settings = ", ".join(f"{key} {value}" for key, value in asdict(size).items())
    (args.out / "SOURCE.md").write_text(
        "# Demo sample: LLMCDSR Food-Kitchen\n\n"
        "Cut by `scripts/make_demo_data.py` (rules in `cdsr_pipeline/data/sample.py`) from\n"
        "`llmcdsr-food-kitchen`: Amazon Grocery & Gourmet Food (A) and Home & Kitchen (B), LLMCDSR\n"
        "release, xhran2010/LLMCDSR (see `../shared/data/README.md`).\n\n"
        f"Settings: {settings}.\n\n"
        f"Rows: " + ", ".join(f"{key} {value}" for key, value in counts.items()) + ".\n\n"
        "Numbers measured on this sample are not comparable with the full release or the papers.\n"
    )
    total = sum(p.stat().st_size for p in args.out.iterdir())
    print(f"wrote {args.out} ({total / 1024:.0f} KiB): {counts}")


if __name__ == "__main__":
    main()
