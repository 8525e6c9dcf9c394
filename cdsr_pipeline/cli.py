"""``cdsr``: run the pipeline and inspect data without opening the Dagster UI.

- ``cdsr run [--select SELECTION] [--config run.yaml] [--source-format F --source-path P --domains A,B]``
  materializes assets (all by default) into ``storage/`` with run history in
  ``storage/dagster`` (``DAGSTER_HOME``) unless set otherwise. Stages whose inputs,
  config and code are unchanged reuse their artifacts.
- ``cdsr stats PATH --format FORMAT [--json]`` prints the split statistics of any
  supported source in the shape of the papers' Table 1.
- ``cdsr llm-log export FILE [--stage S] [--max-file-mb 4]`` / ``cdsr llm-log import FILE...``
  move recorded LLM answers between storages as parquet (split into parts above the
  size limit; verified on import; a recorded answer is never replaced).
- ``cdsr recommend --history ID,ID --domain D [--run RUN] [--k 10] [--exclude-seen] [--json]``:
  the top-k items of a domain for a history, with each tower's share and shared tags.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from .data.ingest import SourceError
from .data.sequences import FilterConfig, build_sequences, format_statistics
from .data.sources import FORMATS, SourceSpec, ingest_source
from .errors import UserInputError
from .llm.calllog import CallLogLockedError
from .llm.portable import STAGES, CallExportError
from .storage import ArtifactStore, default_storage_root


def _domains(value: str | None) -> list[str] | None:
    if value is None:
        return None
    names = [v.strip() for v in value.split(",") if v.strip()]
    if len(names) != 2:
        raise argparse.ArgumentTypeError(f"--domains takes two comma-separated names, got {value!r}")
    return names


def cmd_stats(args: argparse.Namespace) -> int:
    spec = SourceSpec(
        format=args.format,
        path=args.path,
        domains=tuple(args.domains) if args.domains else None,
        items_path=args.items_path,
    )
    config = FilterConfig(
        min_user_interactions=args.min_user_interactions,
        min_item_interactions=args.min_item_interactions,
        min_items_per_domain=args.min_items_per_domain,
    )
    with tempfile.TemporaryDirectory(prefix="cdsr-stats-") as tmp:
        report = ingest_source(spec, Path(tmp) / "raw", temp_dir=Path(tmp) / "duckdb")
        result = build_sequences(
            Path(tmp) / "raw",
            Path(tmp) / "seq",
            dataset=spec.dataset,
            domain_names=report.domain_names,
            config=config,
            temp_dir=Path(tmp) / "duckdb",
            notes=report.notes,
        )
    stats = result.stats | {"quarantined": report.quarantined}
    if args.json:
        print(json.dumps(stats, indent=2))
    else:
        print(format_statistics(stats))
        if report.quarantined:
            print("quarantined: " + ", ".join(f"{k} {v:,}" for k, v in sorted(report.quarantined.items())))
    return 0


def _run_config(args: argparse.Namespace) -> dict:
    config: dict = {}
    if args.config:
        import yaml

        config = yaml.safe_load(Path(args.config).read_text()) or {}
    source = {
        key: value
        for key, value in (
            ("format", args.source_format),
            ("path", str(Path(args.source_path).resolve()) if args.source_path else None),
            ("domains", args.domains),
            ("items_path", args.items_path),
        )
        if value is not None
    }
    if source:
        config.setdefault("resources", {}).setdefault("source", {}).setdefault("config", {}).update(source)
    if args.storage:
        config.setdefault("resources", {}).setdefault("storage", {}).setdefault("config", {})["root"] = str(
            Path(args.storage).resolve()
        )
    config.setdefault("loggers", {"console": {"config": {"log_level": args.log_level}}})
    return config


_SELECTION_PART = re.compile(r"\*?\+*[A-Za-z_][A-Za-z0-9_]*\+*\*?")  # a name, with Dagster's * and + around it


def resolve_selection(text: str, asset_graph):
    """The asset keys of a ``--select`` value, or a one-line error with a hint.

    Dagster's selection syntax (``key:a or key:b``, ``*a``, ``a+``), or a comma list of
    such selections (``a,b``, ``*a,b+``): the union of its parts.
    """
    import dagster as dg
    from dagster._core.definitions.asset_selection import DagsterInvalidAssetSelectionError
    from dagster._core.errors import DagsterInvalidSubsetError

    names = {key.to_user_string() for key in asset_graph.get_all_asset_keys()}
    parts = [part.strip() for part in text.split(",")]
    hint = "write several assets as 'a,b' or 'key:a or key:b'; assets: " + ", ".join(sorted(names))
    if len(parts) > 1 and all(_SELECTION_PART.fullmatch(part) for part in parts):
        unknown = [part.strip("*+") for part in parts if part.strip("*+") not in names]
        if unknown:
            return f"--select {text!r}: no asset named {', '.join(unknown)}; {hint}"
        keys = set()
        for part in parts:
            keys |= set(dg.AssetSelection.from_string(part).resolve(asset_graph))
        return sorted(keys)
    try:
        selection = sorted(dg.AssetSelection.from_string(text).resolve(asset_graph))
    except DagsterInvalidSubsetError:
        unknown = sorted({p.strip("*+") for p in re.split(r"\s+|,", text) if p.strip("*+")} - names) or [text]
        return f"--select {text!r}: no asset named {', '.join(unknown)}; {hint}"
    except DagsterInvalidAssetSelectionError:
        return f"--select {text!r} is not a valid selection; {hint}"
    if not selection:
        return f"--select {text!r} matches no asset; {hint}"
    return selection


def cmd_run(args: argparse.Namespace) -> int:
    storage = _storage_root(args)
    os.environ.setdefault("DAGSTER_HOME", str(storage / "dagster"))
    home = Path(os.environ["DAGSTER_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    # Default (SQLite) storage in DAGSTER_HOME; no telemetry (offline machines, CI).
    instance_yaml = home / "dagster.yaml"
    if not instance_yaml.exists():
        instance_yaml.write_text("telemetry:\n  enabled: false\n")

    import dagster as dg

    from .definitions import defs

    job = defs.resolve_job_def("cdsr_full_pipeline")
    selection = None
    if args.select:
        selection = resolve_selection(args.select, defs.resolve_asset_graph())
        if isinstance(selection, str):
            print(f"error: {selection}", file=sys.stderr)
            return 2
    started = time.perf_counter()
    # two runs starting at once on a new DAGSTER_HOME would both create its SQLite
    # schema (one of them fails): one at a time creates or opens the instance
    with ArtifactStore(storage).lock("dagster_instance", f"cdsr run opening {home}", timeout=300):
        instance = dg.DagsterInstance.get()
        instance.get_runs(limit=1)  # the run storage's schema exists from here on
    with contextlib.ExitStack() as stack:
        stack.enter_context(instance)
        if args.parallel > 1:  # steps in their own processes, loaded again from the definitions module
            from .definitions import parallel_pipeline_job

            run_config = {**_run_config(args), "execution": {"config": {"max_concurrent": args.parallel}}}
            result = stack.enter_context(
                dg.execute_job(
                    dg.reconstructable(parallel_pipeline_job),
                    instance=instance,
                    run_config=run_config,
                    asset_selection=selection,
                    raise_on_error=False,
                )
            )
        else:
            result = job.execute_in_process(
                run_config=_run_config(args),
                instance=instance,
                asset_selection=selection,
                raise_on_error=False,
            )
    print()
    print(f"run {result.run_id} {'succeeded' if result.success else 'FAILED'} in {time.perf_counter() - started:.1f}s")
    for event in result.get_asset_materialization_events():
        meta = event.materialization.metadata
        reused = meta.get("reused")
        state = "reused (unchanged)" if reused is not None and reused.value else "built"
        seconds = meta.get("build_seconds")
        timing = f" in {seconds.value}s" if seconds is not None and state == "built" else ""
        print(f"  {event.asset_key.to_user_string():<28} {state}{timing}")
    for check in result.get_asset_check_evaluations():
        status = "passed" if check.passed else "FAILED"
        name = f"{check.asset_key.to_user_string()}:{check.check_name}"
        print(f"  check {name:<52} {status}")
    print(f"artifacts: {storage / 'artifacts'}")
    if not result.success:
        disk_full = False
        for event in result.all_events:
            if event.is_step_failure:
                message = _root_cause(event.step_failure_data.error)
                disk_full = disk_full or is_disk_full(message)
                print(f"error in {event.step_key}: {message}", file=sys.stderr)
        if disk_full:
            print(f"error: {disk_full_message(storage)}", file=sys.stderr)
        return 1
    return 0


def _root_cause(error) -> str:
    """The innermost error of a step failure (Dagster wraps it in its own), one line."""
    if error is None:
        return "unknown"
    while error.cause is not None:
        error = error.cause
    lines = error.message.strip().splitlines()
    return lines[0] if lines else error.cls_name or "unknown"


def _storage_root(args: argparse.Namespace) -> Path:
    return Path(args.storage).resolve() if args.storage else default_storage_root()


def _locked_call_log(args: argparse.Namespace, command: str):
    """The storage's call log, once no LLM stage (or other import) is writing it."""
    from .llm import locked_call_log

    store = ArtifactStore(_storage_root(args))
    holder = f"cdsr llm-log {command} (pid {os.getpid()})"
    return locked_call_log(store, holder, on_wait=lambda message: print(message, file=sys.stderr, flush=True))


def cmd_llm_log_export(args: argparse.Namespace) -> int:
    from .llm import call_log_path
    from .llm.portable import export_calls

    path = call_log_path(ArtifactStore(_storage_root(args)))
    if not path.is_file():
        print(f"error: no LLM call log at {path} (run the LLM stages first, or pass --storage)", file=sys.stderr)
        return 2
    limit = None if args.max_file_mb <= 0 else int(args.max_file_mb * 1024 * 1024)
    with _locked_call_log(args, "export") as call_log:
        written, left_out, files = export_calls(call_log, args.file, stage=args.stage, max_file_bytes=limit)
    where = files[0] if len(files) == 1 else f"{len(files)} parts {files[0].name} .. {files[-1].name} in {files[0].parent}"
    print(f"exported {written:,} recorded answers from {path} to {where}")
    if left_out:
        print(f"left out {left_out:,} answers recorded before the log kept prompt prefixes (they cannot be verified)")
    return 0


def cmd_llm_log_import(args: argparse.Namespace) -> int:
    from .llm import call_log_path
    from .llm.portable import export_part_paths, import_calls, read_call_export

    # an export written in parts is named by its own path (NAME.parquet for NAME.partNN.parquet)
    files = [part for name in args.files for part in (export_part_paths(name) or [Path(name)])]
    tables = [read_call_export(file) for file in files]  # every file checked before any is imported
    path = call_log_path(ArtifactStore(_storage_root(args)))
    conflicts = False
    with _locked_call_log(args, "import") as call_log:
        for file, table in zip(files, tables):
            report = import_calls(call_log, table)
            print(f"{file} -> {path}")
            print(report.summary())
            conflicts = conflicts or bool(report.conflicts)
    return 1 if conflicts and args.strict else 0


def find_run(storage: Path, name: str | None) -> Path:
    """A run folder by its report name or folder name; default: the best by validation MRR."""
    from .assets.training import all_run_dirs
    from .model.recommend import RecommendError

    runs = all_run_dirs(ArtifactStore(storage))
    if not runs:
        raise RecommendError(f"no trained run under {storage / 'artifacts'}: materialize a model first (cdsr run)")
    metrics = {run: json.loads((run / "metrics.json").read_text()) for run in runs if (run / "metrics.json").is_file()}
    if name is None:
        return max(metrics, key=lambda run: _mean_valid_mrr(metrics[run]))
    matches = [run for run in runs if run.name == name or metrics.get(run, {}).get("name") == name]
    if not matches:
        names = sorted(metrics[run]["name"] for run in metrics)
        raise RecommendError(f"no run named {name!r}; runs: {', '.join(names)}")
    return matches[0]


def _mean_valid_mrr(metrics: dict) -> float:
    valid = metrics["best_checkpoint"]["valid"]
    return sum(by_protocol["sampled"]["mrr"] for by_protocol in valid.values()) / len(valid)


def cmd_recommend(args: argparse.Namespace) -> int:
    from .model.recommend import load_run, recommend

    storage = _storage_root(args)
    run = load_run(find_run(storage, args.run))
    history = [part for part in args.history.split(",") if part.strip()]
    results = recommend(run, history, args.domain, args.k, exclude_seen=args.exclude_seen)
    if args.json:
        print(json.dumps({"run": run.name, "recommendations": [r.to_dict() for r in results]}, indent=2))
        return 0
    print(f"run {run.name} ({run.folder}); top {len(results)} of {args.domain}")
    for rank, r in enumerate(results, start=1):
        towers = ", ".join(f"{name} {share / r.score:.0%}" for name, share in r.towers.items()) if r.score else "-"
        print(f"{rank:>3}. [{r.item_id}] {r.source_id}  {r.title or '(no title)'}")
        print(f"     score {r.score:.5f} ({towers})" + (f"; tags: {', '.join(t for t, _ in r.tags[:5])}" if r.tags else ""))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .model.recommend import load_run
    from .serve import serve

    storage = _storage_root(args)
    run = load_run(find_run(storage, args.run))
    print(f"serving run {run.name} ({run.folder}) on http://{args.host}:{args.port}")
    serve(run, host=args.host, port=args.port)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cdsr", description="Cross-domain sequential recommendation pipeline")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="materialize assets (all by default)")
    run.add_argument(
        "--select",
        help="assets to materialize: a name, a comma list ('sasrec_model,gru4rec_model') or Dagster's selection "
        "syntax ('key:a or key:b', '*item_tag_matrix' = it and everything upstream, 'cdsr_sequences+')",
    )
    run.add_argument("--config", help="run config YAML (resources and asset config), as in the Dagster launchpad")
    run.add_argument("--source-format", choices=FORMATS, help="override the source resource's format")
    run.add_argument("--source-path", help="override the source resource's path")
    run.add_argument("--domains", type=_domains, help="two domain names, domain A first")
    run.add_argument("--items-path", help="items file for the interactions format")
    run.add_argument("--storage", help="artifact root (default: $CDSR_STORAGE or ./storage)")
    run.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    run.add_argument(
        "--parallel", type=int, default=1, metavar="N",
        help="run up to N independent stages side by side, each in its own process (the job cdsr_parallel_pipeline; "
        "at most one LLM, one encoder and one training stage at a time); default 1: one stage at a time, in process",
    )
    run.set_defaults(func=cmd_run)

    stats = sub.add_parser("stats", help="split statistics of a source in the shape of the papers' Table 1")
    stats.add_argument("path", help="folder (Amazon dumps, releases) or file (interactions)")
    stats.add_argument("--format", required=True, choices=FORMATS)
    stats.add_argument("--domains", type=_domains, help="two domain names / Amazon categories, domain A first")
    stats.add_argument("--items-path", help="items file for the interactions format")
    stats.add_argument("--json", action="store_true", help="print JSON instead of the table")
    defaults = FilterConfig()
    stats.add_argument("--min-user-interactions", type=int, default=defaults.min_user_interactions)
    stats.add_argument("--min-item-interactions", type=int, default=defaults.min_item_interactions)
    stats.add_argument("--min-items-per-domain", type=int, default=defaults.min_items_per_domain)
    stats.set_defaults(func=cmd_stats)

    rec = sub.add_parser("recommend", help="top-k items of a domain for a history, from a trained run")
    rec.add_argument("--run", help="run name as in the report (e.g. TEMA-LLM) or its folder name; default: best by validation MRR")
    rec.add_argument("--history", required=True, help="comma-separated item ids: global ids or source ids (ASINs), oldest first")
    rec.add_argument("--domain", required=True, help="target domain: A, B or its name")
    rec.add_argument("--k", type=int, default=10)
    rec.add_argument("--exclude-seen", action="store_true", help="leave out items of the history")
    rec.add_argument("--json", action="store_true")
    rec.add_argument("--storage", help="storage root (default: $CDSR_STORAGE or ./storage)")
    rec.set_defaults(func=cmd_recommend)

    srv = sub.add_parser("serve", help="a trained run behind an HTTP JSON API (POST /recommend, GET /items/ID, GET /health)")
    srv.add_argument("--run", help="run name or folder name; default: best by validation MRR")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--storage", help="storage root (default: $CDSR_STORAGE or ./storage)")
    srv.set_defaults(func=cmd_serve)

    llm_log = sub.add_parser("llm-log", help="export or import recorded LLM answers (portable parquet)")
    llm_log_sub = llm_log.add_subparsers(dest="llm_log_command", required=True)
    export = llm_log_sub.add_parser("export", help="write the call log's answers to parquet (parts when large)")
    export.add_argument("file", help="parquet file to write (NAME.partNN.parquet beside it when larger than --max-file-mb)")
    export.add_argument(
        "--max-file-mb", type=float, default=4.0, help="largest file to write, in MiB; larger exports are split (0: no limit)"
    )
    export.add_argument("--stage", choices=sorted(STAGES), help="only this stage's answers (default: all)")
    export.add_argument("--storage", help="storage root whose call log to read (default: $CDSR_STORAGE or ./storage)")
    export.set_defaults(func=cmd_llm_log_export)
    imp = llm_log_sub.add_parser("import", help="add exported answers to this storage's call log")
    imp.add_argument("files", nargs="+", metavar="FILE", help="files written by `cdsr llm-log export` (an export in parts: its NAME.parquet)")
    imp.add_argument("--storage", help="storage root whose call log to extend (default: $CDSR_STORAGE or ./storage)")
    imp.add_argument("--strict", action="store_true", help="exit 1 when any answer conflicts with a recorded one")
    imp.set_defaults(func=cmd_llm_log_import)
    return parser


_DISK_FULL_WORDS = ("no space left on device", "database or disk is full", "disk is full")


def is_disk_full(error: BaseException | str) -> bool:
    """An error (or a step's error message) that says the disk filled up."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    text = str(error).lower()
    return any(words in text for words in _DISK_FULL_WORDS)


def disk_full_message(storage: Path) -> str:
    try:
        free = f"{shutil.disk_usage(storage).free / 2**20:,.1f} MiB free"
    except OSError:
        free = "free space unknown"
    return (
        f"the disk of {storage} is full ({free}); free some space and run again: completed "
        f"stages are kept and reused, the unfinished ones were not committed and are rebuilt"
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (SourceError, FileNotFoundError, CallExportError, CallLogLockedError, UserInputError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # a full disk anywhere (artifacts, DuckDB, Dagster's SQLite): one line
        if not is_disk_full(error):
            raise
        root = _storage_root(args) if hasattr(args, "storage") else Path.cwd()
        print(f"error: {disk_full_message(root)} ({type(error).__name__}: {str(error).splitlines()[0][:200]})", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
