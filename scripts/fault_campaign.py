"""Inject every fault class a user meets, many times, and print what was lost.

Runs the fault tests (pytest) with more seeds and fuzz examples than CI, then prints one
row per fault class: runs (injected faults that ran to their check), runs that lost data
(an artifact or metric differed from an uninterrupted run, a recorded LLM answer was
asked again or replaced, a file claimed to be complete was not, a good input line was
lost), runs that needed a person (the rerun after the fault failed), and other failures.
Both loss columns must be 0.

    .venv/bin/python scripts/fault_campaign.py --kill-seeds 4 --fuzz-examples 300

Each test names its failure ("lost data: ...", "needed a person: ...") so that the
table can count them; any other failure is counted as "other".
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class FaultClass:
    name: str
    selector: str  # pytest node id or file, with an optional -k expression
    keyword: str | None
    faults_per_test: int  # injected faults in one test case


def fault_classes(fuzz_examples: int) -> list[FaultClass]:
    return [
        FaultClass("killed mid-stage (ingest, sequences, encoding, training, report), one SIGKILL per stage in turn",
                   "tests/test_killed_runs.py", "every_stage", 5),
        FaultClass("killed mid-LLM-stage (augmentation)", "tests/test_killed_runs.py", "llm_stage", 1),
        FaultClass("killed in the tag stages (vocabularies, then tag scores)", "tests/test_killed_runs.py", "tag_stages", 2),
        FaultClass("disk full (tmpfs of 40 KiB; artifacts, then Dagster's SQLite fill it)", "tests/test_disk_full.py", None, 1),
        FaultClass("concurrent runs on one storage root", "tests/test_concurrent_runs.py", None, 1),
        FaultClass("tampered artifacts (edited, truncated, wrong hash, code-running checkpoint)",
                   "tests/test_tampered_artifacts.py", None, 1),
        FaultClass("LLM server faults (timeouts, HTTP 5xx, cut streams, another model, server death; with several servers "
                   "a failing, a slow, a mismatched and a dead one)",
                   "tests/test_llm_ollama.py",
                   "times_out or errors_are_retried or cut or another_model or dies or unreachable or set_aside or slow_server "
                   "or other_weights", 1),
        FaultClass("hostile item text (prompt injection, controls, 120 KB title, bidi marks)",
                   "tests/test_llm_ollama.py", "hostile or json_scoring", 1),
        FaultClass(f"corrupted input lines (hypothesis, {fuzz_examples} examples per format; CSV, Amazon 2014/2018/2023 JSON, LLMCDSR, C2DSR)",
                   "tests/test_fuzz_readers.py", None, fuzz_examples),  # per test case: one format
    ]


def run_class(fault: FaultClass, env: dict[str, str], junit: Path) -> tuple[int, int, int, int, float]:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", fault.selector, f"--junitxml={junit}"]
    if fault.keyword:
        command += ["-k", fault.keyword]
    started = time.monotonic()
    subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.monotonic() - started
    cases = ET.parse(junit).getroot().iter("testcase")
    runs = lost = person = other = 0
    for case in cases:
        if case.find("skipped") is not None:
            continue
        runs += fault.faults_per_test
        failure = case.find("failure")
        if failure is None:
            failure = case.find("error")
        if failure is None:
            continue
        text = (failure.get("message") or "") + (failure.text or "")
        if "lost data" in text:
            lost += 1
        elif "needed a person" in text:
            person += 1
        else:
            other += 1
    return runs, lost, person, other, seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kill-seeds", type=int, default=3, help="seeds of the kill tests (each: one kill per stage)")
    parser.add_argument("--fuzz-examples", type=int, default=200, help="hypothesis examples per raw format")
    parser.add_argument("--only", help="run only the fault classes whose name contains this text")
    args = parser.parse_args()
    env = {**os.environ, "CDSR_KILL_SEEDS": ",".join(str(s) for s in range(args.kill_seeds)),
           "CDSR_FUZZ_EXAMPLES": str(args.fuzz_examples)}
    rows = []
    with tempfile.TemporaryDirectory(prefix="cdsr-faults-") as work:
        classes = [f for f in fault_classes(args.fuzz_examples) if args.only is None or args.only in f.name]
        for number, fault in enumerate(classes):
            print(f"[fault_campaign] {fault.name} ...", flush=True)
            result = run_class(fault, env, Path(work) / f"class{number}.xml")
            rows.append((fault.name, *result))
    print()
    print("| fault class | faults injected | cases that lost data | cases that needed a person | other failing cases | seconds |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, runs, lost, person, other, seconds in rows:
        print(f"| {name} | {runs} | {lost} | {person} | {other} | {seconds:.0f} |")
    bad = sum(lost + person + other for _, _, lost, person, other, _ in rows)
    print(f"\n{'all faults handled' if bad == 0 else f'{bad} failing test case(s): rerun them with pytest to see why'}")
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
