"""Requests/s and latency of ``cdsr serve`` on loopback, with 1, 8 and 32 concurrent clients.

    python benchmarks/serve.py [--storage storage] [--run TEMA-LLM] [--requests 2500] [--seconds 20] [--workers 1]

Serves a materialized run (default: the best run of ``--storage``; ``make run`` makes
the demo's) with uvicorn in a thread of this process (``--workers 1``) or as ``cdsr serve
--workers N`` in a process group of its own, and drives it from another process with
keep-alive HTTP/1.1 clients posting ``/recommend`` (k = 10) for histories taken from the
split's test rows. Each level stops after ``--requests`` requests or ``--seconds``,
whichever comes first. Prints requests/s, p50/p99 latency, the server's CPU per request
(with workers: every process of the group, from /proc), the forward passes per request
(batching; one process only) and the peak resident memory.

Targets (issue "Use the trained model", for a TEMA-LLM run of the full release on
2 cores): p99 under 20 ms at 8 clients, at least 500 requests/s at 32 clients.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cdsr_pipeline.cli import find_run  # noqa: E402
from cdsr_pipeline.model.data import load_sequences  # noqa: E402
from cdsr_pipeline.model.recommend import load_run  # noqa: E402
from cdsr_pipeline.serve import create_app  # noqa: E402

TARGETS = {8: ("p99_ms", 20.0), 32: ("rps", 500.0)}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _request_bytes(port: int, history: list[int], domain: str) -> bytes:
    body = json.dumps({"history": history, "domain": domain, "k": 10}).encode()
    head = (
        f"POST /recommend HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _drive(port: int, histories: list[tuple[list[int], str]], clients: int, requests: int, seconds: float):
    """``clients`` keep-alive HTTP/1.1 connections, each posting its next request as soon as
    the answer to its last one has arrived. The requests are encoded once, before the
    clock starts, and answers are read by their Content-Length: a client costs a fraction
    of the server's CPU per request (httpx's cost 2.8 ms per request at 32 clients, more
    than the server, on the same two cores)."""
    encoded = [_request_bytes(port, history, domain) for history, domain in histories]
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    counter = iter(range(requests))

    async def client() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for index in counter:
                if time.perf_counter() > deadline:
                    return
                started = time.perf_counter()
                writer.write(encoded[index % len(encoded)])
                head = await reader.readuntil(b"\r\n\r\n")
                status = head.split(b" ", 2)[1]
                if status != b"200":
                    raise RuntimeError(f"the server answered {head.decode(errors='replace').splitlines()[0]}")
                length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")))
                await reader.readexactly(length)
                latencies.append(time.perf_counter() - started)
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.perf_counter() - started
    return np.array(latencies), elapsed


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _drive_sync(*args) -> tuple[np.ndarray, float, float]:
    """(latencies, elapsed, CPU seconds the clients used)."""
    cpu = _cpu_seconds()
    latencies, elapsed = asyncio.run(_drive(*args))
    return latencies, elapsed, _cpu_seconds() - cpu


def _group_cpu_seconds(leader: int) -> float:
    """CPU seconds (user + system) of ``leader`` and every process it started (Linux /proc)."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        parents[int(entry.name)] = int(fields[1])
        times[int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick
    group, frontier = {leader}, [leader]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier and pid not in group]
        group.update(children)
        frontier = children
    return sum(times.get(pid, 0.0) for pid in group)


def _group_peak_mib(leader: int) -> float:
    """Sum of the peak resident memory (VmHWM) of ``leader``'s child processes, in MiB."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        try:
            status = (entry / "status").read_text() if entry.name.isdigit() else ""
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if fields.get("PPid", "").strip() == str(leader) and "VmHWM" in fields:
            total += int(fields["VmHWM"].split()[0]) / 1024
    return total


def _start_workers(storage: Path, run_folder: Path, port: int, workers: int, log) -> subprocess.Popen:
    """``cdsr serve --workers N`` in its own process group (its log to ``log``), once it answers /health."""
    import urllib.request

    command = [sys.executable, "-m", "cdsr_pipeline.cli", "serve", "--storage", str(storage), "--run", run_folder.name]
    server = subprocess.Popen(
        [*command, "--port", str(port), "--workers", str(workers)],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            log.seek(0)
            raise SystemExit(f"cdsr serve --workers {workers} ended: {log.read().decode(errors='replace')[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                return server
        except OSError:
            time.sleep(0.5)
    os.killpg(server.pid, signal.SIGKILL)
    raise SystemExit(f"cdsr serve --workers {workers} did not answer within 300 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", type=Path, default=ROOT / "storage")
    parser.add_argument("--run", help="run name (default: the best by validation MRR)")
    parser.add_argument("--requests", type=int, default=2500, help="requests per concurrency level (at 32 clients a few hundred last about a second: too short a window for the steady rate)")
    parser.add_argument("--seconds", type=float, default=20.0, help="time bound per concurrency level")
    parser.add_argument("--workers", type=int, default=1, help="server processes (cdsr serve --workers N); 1: in this process")
    args = parser.parse_args()

    import uvicorn

    run = load_run(find_run(args.storage.resolve(), args.run))
    test = load_sequences(run.sequences, "test", max_len=run.max_len)
    histories = []
    for row in range(len(test)):
        history = test.inputs[row, : test.lengths[row]].tolist()
        domain = "B" if test.last_targets[row] >= run.domains.sizes[0] else "A"
        histories.append((history, domain))
    port = _free_port()
    if args.workers == 1:
        app = create_app(run)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        threads = torch.get_num_threads()
        server_cpu_seconds, rounds_run = _cpu_seconds, lambda: app.state.batcher.batches
    else:
        import tempfile

        log = tempfile.TemporaryFile()  # uvicorn logs every request: a pipe left unread would fill and block it
        workers = _start_workers(args.storage.resolve(), run.folder, port, args.workers, log)
        threads = max(1, (os.cpu_count() or 1) // args.workers)
        server_cpu_seconds, rounds_run = (lambda: _group_cpu_seconds(workers.pid)), (lambda: None)
    print(
        f"run {run.name} ({run.folder}); {len(histories)} test histories; items {run.domains.sizes}; "
        f"{args.workers} server process(es) x {threads} torch thread(s), CPU capability {torch.backends.cpu.get_cpu_capability()}"
    )
    try:
        # the clients run in another process: sharing the server's interpreter (its GIL)
        # they would measure themselves as much as the server
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as clients_process:
            clients_process.submit(_drive_sync, port, histories, 4, 40, 10).result()  # warm-up
            for clients in (1, 8, 32):
                before, server_cpu = rounds_run(), server_cpu_seconds()
                latencies, elapsed, client_cpu = clients_process.submit(
                    _drive_sync, port, histories, clients, args.requests, args.seconds
                ).result()
                server_cpu = server_cpu_seconds() - server_cpu
                batching = (
                    f"{(rounds_run() - before) / max(len(latencies), 1):.2f} forward rounds per request"
                    if before is not None else "forward rounds not counted (workers)"
                )
                rps = len(latencies) / elapsed
                p50, p99 = (np.percentile(latencies, q) * 1000 for q in (50, 99))
                line = (
                    f"clients {clients:>2}: {len(latencies):>5} requests in {elapsed:5.1f} s = {rps:7.1f} req/s; "
                    f"p50 {p50:6.1f} ms, p99 {p99:6.1f} ms; {batching}; "
                    f"CPU per request: server {server_cpu / max(len(latencies), 1) * 1000:.2f} ms, "
                    f"clients {client_cpu / max(len(latencies), 1) * 1000:.2f} ms"
                )
                if clients in TARGETS:
                    metric, target = TARGETS[clients]
                    value = p99 if metric == "p99_ms" else rps
                    met = value <= target if metric == "p99_ms" else value >= target
                    line += f"; target {metric} {'<=' if metric == 'p99_ms' else '>='} {target:g}: {'met' if met else 'NOT met'}"
                print(line, flush=True)
    finally:
        if args.workers == 1:
            server.should_exit = True
            thread.join(timeout=10)
        else:
            peak = _group_peak_mib(workers.pid)
            os.killpg(workers.pid, signal.SIGINT)
            workers.wait(timeout=60)
    if args.workers == 1:
        print(f"peak resident memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    else:
        print(f"peak resident memory of the {args.workers} workers together {peak:.0f} MiB")


if __name__ == "__main__":
    main()
