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

    from .assets.llm import SHARDS
    from .automation import SHARDED_ASSETS
    from .definitions import defs

    graph = defs.resolve_asset_graph()
    selection = None
    if args.select:
        selection = resolve_selection(args.select, graph)
        if isinstance(selection, str):
            print(f"error: {selection}", file=sys.stderr)
            return 2
    if args.shard is not None and not SHARDED_ASSETS:
        print("error: --shard needs item shards: set CDSR_LLM_SHARDS to their number (above 1)", file=sys.stderr)
        return 2
    phases = _run_phases(defs, graph, selection, SHARDED_ASSETS, args.shard)
    if phases is None:
        print(f"error: --shard {args.shard}: not one of the shards 0..{SHARDS - 1}, or the selection holds none of "
              f"the sharded LLM stages ({', '.join(SHARDED_ASSETS)})", file=sys.stderr)
        return 2
    started = time.perf_counter()
    # two runs starting at once on a new DAGSTER_HOME would both create its SQLite
    # schema (one of them fails): one at a time creates or opens the instance
    with ArtifactStore(storage).lock("dagster_instance", f"cdsr run opening {home}", timeout=300):
        instance = dg.DagsterInstance.get()
        instance.get_runs(limit=1)  # the run storage's schema exists from here on
    with instance:
        for label, job_name, keys, shards in phases:
            if label:
                print(f"== {label}", flush=True)
            if shards and args.parallel > 1:
                ok = _run_shards_in_processes(args, keys, shards)
            else:
                ok = all(
                    _execute(dg, defs, instance, args, job_name, keys, shard, storage, started) for shard in (shards or [None])
                )
            if not ok:
                return 1
    return 0


def _run_phases(defs, graph, selection, sharded: tuple[str, ...], only_shard: int | None):
    """What ``cdsr run`` executes, in order: (label, job, asset keys, partition keys).

    Without item shards, one run of the selection. With them (``CDSR_LLM_SHARDS``), the
    selected stages upstream of the sharded LLM stages, then each shard of those (one run
    per partition), then the rest; ``--shard K`` runs the first two for shard K only.
    None when ``--shard`` names nothing to run.
    """
    full = "cdsr_full_pipeline"
    if not sharded:
        return [(None, full, selection, None)]
    shard_job = defs.resolve_job_def("cdsr_llm_shards")
    shard_keys_all = set(shard_job.asset_layer.executable_asset_keys)
    wanted = set(selection) if selection is not None else set(defs.resolve_job_def(full).asset_layer.executable_asset_keys) | shard_keys_all
    shard_keys = sorted(wanted & shard_keys_all)
    partitions = shard_job.partitions_def.get_partition_keys()
    if only_shard is not None:
        if not shard_keys or str(only_shard) not in partitions:
            return None
        partitions = [str(only_shard)]
    upstream = _ancestors(graph, shard_keys)
    rest = wanted - set(shard_keys)
    before, after = sorted(rest & upstream), sorted(rest - upstream)
    phases = []
    if before:
        phases.append(("stages upstream of the LLM shards", full, before, None))
    if shard_keys:
        phases.append((f"{len(partitions)} item shard(s) of {', '.join(k.path[-1] for k in shard_keys)}", "cdsr_llm_shards", shard_keys, partitions))
    if after and only_shard is None:
        phases.append(("the rest", full, after, None))
    return phases


def _ancestors(graph, keys) -> set:
    """Every asset upstream of ``keys`` in ``graph`` (not ``keys`` themselves)."""
    seen, todo = set(), list(keys)
    while todo:
        for parent in graph.get(todo.pop()).parent_keys:
            if parent not in seen:
                seen.add(parent)
                todo.append(parent)
    return seen


def _job_run_config(args: argparse.Namespace, job) -> dict:
    """The run config of ``args`` for ``job``: with item shards, the op config of the
    sharded stages goes to the shard job only, and only theirs to it (Dagster refuses
    config for ops a job does not hold)."""
    from .automation import SHARDED_ASSETS as sharded

    config = _run_config(args)
    ops = config.get("ops")
    if ops and sharded:
        keep = (lambda name: name in sharded) if job.name == "cdsr_llm_shards" else (lambda name: name not in sharded)
        config = {**config, "ops": {name: value for name, value in ops.items() if keep(name)}}
    return config


def _execute(dg, defs, instance, args, job_name: str, keys, shard: str | None, storage: Path, started: float) -> bool:
    """One Dagster run of ``keys`` (of one shard when ``shard``), reported as it ends."""
    job = defs.resolve_job_def(job_name)
    run_config = _job_run_config(args, job)
    if args.parallel > 1 and job_name == "cdsr_full_pipeline":  # steps in their own processes, loaded again from the definitions module
        from .definitions import parallel_pipeline_job

        run_config["execution"] = {"config": {"max_concurrent": args.parallel}}
        with dg.execute_job(
            dg.reconstructable(parallel_pipeline_job), instance=instance, run_config=run_config,
            asset_selection=keys, raise_on_error=False,
        ) as result:
            return _report_run(result, storage, started)
    result = job.execute_in_process(
        run_config=run_config, instance=instance, asset_selection=keys, partition_key=shard, raise_on_error=False,
    )
    return _report_run(result, storage, started, shard)


def _run_shards_in_processes(args: argparse.Namespace, keys, shards: list[str]) -> bool:
    """Each shard in its own ``cdsr run --shard K`` process, ``--parallel`` at a time."""
    import subprocess

    base = [sys.executable, "-m", "cdsr_pipeline.cli", "run", "--select", ",".join(k.path[-1] for k in keys)]
    for flag in ("config", "source_format", "source_path", "items_path", "storage"):
        if getattr(args, flag):
            base += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    if args.domains:
        base += ["--domains", ",".join(args.domains)]
    pending, running, failed = list(shards), [], []
    while pending or running:
        while pending and len(running) < args.parallel:
            shard = pending.pop(0)
            print(f"shard {shard}: started (its own process)", flush=True)
            running.append((shard, subprocess.Popen([*base, "--shard", shard])))
        time.sleep(0.5)
        for shard, process in list(running):
            if process.poll() is not None:
                running.remove((shard, process))
                if process.returncode != 0:
                    failed.append(shard)
    if failed:
        print(f"error: shard(s) {', '.join(failed)} failed (see above); rerun them with --shard K", file=sys.stderr)
    return not failed


def _report_run(result, storage: Path, started: float, shard: str | None = None) -> bool:
    """Print a run's outcome: each asset built or reused, each check, the errors."""
    print()
    where = f" (shard {shard})" if shard is not None else ""
    print(f"run {result.run_id}{where} {'succeeded' if result.success else 'FAILED'} in {time.perf_counter() - started:.1f}s")
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
        return False
    return True


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


def cmd_towers(args: argparse.Namespace) -> int:
    from .data.schema import DOMAINS
    from .model.data import DENSE_MODALITIES, load_item_features, load_sequences
    from .model.diagnostics import (
        ALL_TOWERS,
        FEATURE_NAMES,
        NoTowersError,
        content_similarity,
        random_mrr,
        tower_contributions,
        view_contributions,
    )
    from .model.recommend import RecommendError, load_run

    run = load_run(find_run(_storage_root(args), args.run))
    arrays = load_sequences(run.sequences, args.split, max_len=run.max_len)
    try:
        rows = tower_contributions(run.model, arrays, run.domains, progress=True)
    except NoTowersError as error:
        raise RecommendError(f"run {run.name}: {error}") from None
    views = view_contributions(run.model, arrays, run.domains, progress=True)
    features = load_item_features(run.features, run.domains.num_items, {*DENSE_MODALITIES, "tag"})
    content = content_similarity(features, arrays, run.domains, progress=True)
    if args.json:
        print(
            json.dumps(
                {
                    "run": run.name,
                    "split": args.split,
                    "towers": [row.to_dict() for row in rows],
                    "views": [row.to_dict() for row in views],
                    "features_alone": [row.to_dict() for row in content],
                },
                indent=2,
            )
        )
        return 0
    chance = ", ".join(f"{name} {100 * random_mrr(size):.2f}" for name, size in zip(run.domains.names, run.domains.sizes, strict=True))
    print(f"run {run.name} ({run.folder}); {args.split} rows; full ranking over the target domain's items")
    print(f"(a random ranking's MRR (%): {chance})")
    print("| domain | tower | rows | MRR ranked by it alone (%) | share of the top-10 scores |")
    print("|---|---|---:|---:|---:|")
    for row in rows:
        name = run.domains.names[DOMAINS.index(row.domain)]
        share = "-" if row.top10_share is None else f"{row.top10_share:.3f}"
        tower = "all (the run's ranking)" if row.part == ALL_TOWERS else row.part
        print(f"| {name} | {tower} | {row.rows} | {100 * row.mrr_alone:.2f} | {share} |")
    if len(run.views) > 1:
        print("\nBy sequence (every tower's term of the view; w: its sequence weight for the target domain)")
        print("| domain | sequence | w | rows | MRR ranked by it alone (%) | share of the top-10 scores |")
        print("|---|---|---:|---:|---:|---:|")
        weights = run.model.summary["view_weights"]
        sequences = {"X": f"X ({run.domains.names[0]} items)", "Y": f"Y ({run.domains.names[1]} items)", "XY": "XY (merged)"}
        for row in views:
            if row.part == ALL_TOWERS:
                continue
            name = run.domains.names[DOMAINS.index(row.domain)]
            print(
                f"| {name} | {sequences[row.part]} | {weights[name][row.part]:.2f} | {row.rows} | "
                f"{100 * row.mrr_alone:.2f} | {row.top10_share:.3f} |"
            )
    print("\nThe features alone, no training: items ranked by the cosine of their vector to the mean of the history's")
    print("| domain | feature | rows | MRR (%) |")
    print("|---|---|---:|---:|")
    for row in content:
        name = run.domains.names[DOMAINS.index(row.domain)]
        print(f"| {name} | {FEATURE_NAMES[row.feature]} | {row.rows} | {100 * row.mrr:.2f} |")
    return 0


def _mrr_pair(mrr: dict[str, float]) -> str:
    return f"{100 * mrr['sampled']:.2f} / {100 * mrr['full']:.2f}"


def cmd_sequence_weights(args: argparse.Namespace) -> int:
    from .model.config import train_config_from_dict
    from .model.data import load_sequences
    from .model.diagnostics import TRAINED, NoTowersError, sequence_weight_search
    from .model.evaluate import EvaluationSplit
    from .model.recommend import RecommendError, load_run
    from .model.trainer import CONFIG_FILE

    run = load_run(find_run(_storage_root(args), args.run))
    config = train_config_from_dict(json.loads((run.folder / CONFIG_FILE).read_text())["train_config"])
    splits = [
        EvaluationSplit.create(
            name, load_sequences(run.sequences, name, max_len=run.max_len), run.domains, config.num_negatives, config.negatives_seed
        )
        for name in ("valid", "test")
    ]
    try:
        rows = sequence_weight_search(run.model, splits, run.domains, selection_protocol=config.selection_protocol, progress=True)
    except (NoTowersError, ValueError) as error:
        raise RecommendError(f"run {run.name}: {error}") from None
    chosen = rows[0]
    trained = next(row for row in rows if row.label == TRAINED)
    if args.json:
        print(json.dumps({"run": run.name, "selection_protocol": config.selection_protocol, "chosen": chosen.label,
                          "rows": [row.to_dict() for row in rows]}, indent=2))
        return 0
    names = run.domains.names
    weights = ", ".join(f"{name}: {' / '.join(f'{w:g}' for w in run.model.view_weights[d].tolist())}" for d, name in enumerate(names))
    print(f"run {run.name} ({run.folder}); sequences X ({names[0]} items), Y ({names[1]} items), XY (merged)")
    print(f"trained with w(X / Y / XY) = {weights}; re-weighted at inference: own domain's sequence 1, the other's and the merged as given")
    print(f"MRR (%) sampled / full; ordered by the validation MRR ({config.selection_protocol}, mean of the domains): choose on it alone")
    print(f"| weights | valid mean | valid {names[0]} | valid {names[1]} |")
    print("|---|---:|---|---|")
    for row in rows:
        print(f"| {row.label} | {100 * row.selection(config.selection_protocol):.2f} | {_mrr_pair(row.valid['A'])} | {_mrr_pair(row.valid['B'])} |")
    print(f"\nTest, at the weights chosen on validation ({chosen.label}) and as trained:")
    print(f"| weights | test {names[0]} | test {names[1]} |")
    print("|---|---|---|")
    for row in [chosen] if chosen is trained else [chosen, trained]:
        print(f"| {row.label} | {_mrr_pair(row.test['A'])} | {_mrr_pair(row.test['B'])} |")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .model.recommend import RecommendError, load_run
    from .serve import serve

    if args.workers < 1:  # before anything is loaded or printed (serve() checks it too, for library callers)
        raise RecommendError(f"--workers must be at least 1, not {args.workers}")
    storage = _storage_root(args)
    folder = find_run(storage, args.run)
    if args.workers == 1:
        run = load_run(folder)
        print(f"serving run {run.name} ({run.folder}) on http://{args.host}:{args.port}")
        serve(run, host=args.host, port=args.port)
    else:  # each worker process loads the run itself
        print(f"serving run {folder.name} on http://{args.host}:{args.port} with {args.workers} worker processes")
        serve(folder, host=args.host, port=args.port, workers=args.workers)
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
    run.add_argument(
        "--shard", type=int, metavar="K",
        help="with item shards (CDSR_LLM_SHARDS=N): run only shard K of the sharded LLM stages in the selection "
        "(and what they need upstream), e.g. one shard per process or host; --parallel N runs N shards side by side",
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

    towers = sub.add_parser(
        "towers",
        help="what each tower and each sequence of a trained run contributes (MRR ranked by it alone, its share of "
        "the top-10 scores), beside what each feature ranks by itself with no training",
    )
    towers.add_argument("--run", help="run name as in the report or its folder name; default: best by validation MRR")
    towers.add_argument("--split", choices=["valid", "test"], default="test")
    towers.add_argument("--json", action="store_true")
    towers.add_argument("--storage", help="storage root (default: $CDSR_STORAGE or ./storage)")
    towers.set_defaults(func=cmd_towers)

    weights = sub.add_parser(
        "sequence-weights",
        help="a multi-attention run's MRR with its three sequences re-weighted at inference (a grid, plus the trained "
        "weights), ordered by validation MRR; test only at the weights chosen on validation",
    )
    weights.add_argument("--run", help="run name as in the report or its folder name; default: best by validation MRR")
    weights.add_argument("--json", action="store_true")
    weights.add_argument("--storage", help="storage root (default: $CDSR_STORAGE or ./storage)")
    weights.set_defaults(func=cmd_sequence_weights)

    srv = sub.add_parser("serve", help="a trained run behind an HTTP JSON API (POST /recommend, GET /items/ID, GET /health)")
    srv.add_argument("--run", help="run name or folder name; default: best by validation MRR")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument(
        "--workers", type=int, default=1, metavar="N",
        help="server processes sharing the port, each with its own copy of the model and cores/N torch threads "
        "(default 1; on 2 cores, 2 answer about 1.5x the requests/s of 1)",
    )
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
