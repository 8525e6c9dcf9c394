"""Wall time of every materialized stage of a storage, from the assets' manifests.

``build_seconds`` is the time of the materialization that built the current artifact
(a stage resumed over several runs reports its last run only; the LLM stages' call
statistics add the LLM time spent on answers recorded earlier). Prints a Markdown table.

    python scripts/stage_times.py --storage ~/cdsr-release/food-kitchen
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", required=True, type=Path)
    args = parser.parse_args()
    print("| asset | built in (s) | LLM calls: asked / served from the log | LLM seconds (this build) |")
    print("|---|---:|---:|---:|")
    for manifest_file in sorted((args.storage / "artifacts").glob("*/manifest.json")):
        meta = json.loads(manifest_file.read_text())["metadata"]
        calls = f"{meta['asked']:,} / {meta['cached']:,}" if "asked" in meta else ""
        llm = f"{meta['llm_seconds']:,.0f}" if "llm_seconds" in meta else ""
        print(f"| `{manifest_file.parent.name}` | {meta.get('build_seconds', float('nan')):,.1f} | {calls} | {llm} |")


if __name__ == "__main__":
    main()
