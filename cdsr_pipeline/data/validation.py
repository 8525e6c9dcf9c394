"""Data-quality rules over a sequences folder (the asset checks call these).

Each rule returns a :class:`CheckOutcome`: whether it passed, and the numbers that
show why, so a failing check names the offending rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from .sequences import DOMAINS_FILE, ITEMS_OUT, FilterConfig, split_file

EXAMPLES = 5


@dataclass
class CheckOutcome:
    passed: bool
    description: str
    details: dict = field(default_factory=dict)


def _splits(folder: Path) -> dict[str, pl.DataFrame]:
    return {s: pl.read_parquet(folder / split_file(s)) for s in ("train", "valid", "test")}


def check_contiguous_ids(folder: Path) -> CheckOutcome:
    """Item ids are 0..n-1, domain A's first, and every sequence id refers to an item."""
    items = pl.read_parquet(folder / ITEMS_OUT)
    domains = json.loads((folder / DOMAINS_FILE).read_text())
    ids = items["item_id"].to_list()
    n = len(ids)
    n_a = domains["A"]["num_items"]
    problems = []
    if ids != list(range(n)):
        problems.append("item ids are not 0..n-1 in order")
    if items["domain"].to_list() != ["A"] * n_a + ["B"] * (n - n_a):
        problems.append("domain A items do not all come before domain B items")
    for split, frame in _splits(folder).items():
        bad = frame.filter(pl.col("sequence").list.eval((pl.element() < 0) | (pl.element() >= n)).list.any())
        if bad.height:
            problems.append(f"{split}: {bad.height} sequences hold unknown item ids, e.g. users {bad['user'].head(EXAMPLES).to_list()}")
    return CheckOutcome(
        passed=not problems,
        description="item ids contiguous, domain A first, sequences reference known items",
        details={"items": n, "domain_A_items": n_a, "problems": problems},
    )


def check_no_leakage(folder: Path) -> CheckOutcome:
    """Every valid/test target comes after its history and after the user's training data."""
    splits = _splits(folder)
    problems = []
    for split in ("valid", "test"):
        frame = splits[split]
        short = frame.filter(pl.col("sequence").list.len() < 2)
        if short.height:
            problems.append(f"{split}: {short.height} rows without history, e.g. {short['user'].head(EXAMPLES).to_list()}")
        timed = frame.filter(pl.col("timestamps").is_not_null() & (pl.col("timestamps").list.len() >= 2))
        early = timed.filter(pl.col("timestamps").list.last() < pl.col("timestamps").list.head(pl.col("timestamps").list.len() - 1).list.max())
        if early.height:
            problems.append(f"{split}: {early.height} targets precede their own history, e.g. {early['user'].head(EXAMPLES).to_list()}")
        train_end = splits["train"].filter(pl.col("timestamps").is_not_null()).select(
            "user", pl.col("timestamps").list.max().alias("train_end")
        )
        joined = timed.join(train_end, on="user", how="inner").filter(pl.col("timestamps").list.last() < pl.col("train_end"))
        if joined.height:
            problems.append(
                f"{split}: {joined.height} targets precede the same user's training data, e.g. {joined['user'].head(EXAMPLES).to_list()}"
            )
    return CheckOutcome(
        passed=not problems,
        description="valid/test targets come after the history and the user's training data",
        details={"problems": problems, "valid_rows": splits["valid"].height, "test_rows": splits["test"].height},
    )


def check_minimums(folder: Path, config: FilterConfig, released: bool) -> CheckOutcome:
    """Raw sources: every user meets the per-domain and total minimums, every item its minimum.

    Released splits are kept exactly as published, so the thresholds do not apply to
    them; the rule then only asserts that evaluation rows have a history.
    """
    splits = _splits(folder)
    domains = json.loads((folder / DOMAINS_FILE).read_text())
    n_a = domains["A"]["num_items"]
    if released:
        return CheckOutcome(
            passed=True,
            description="released split: filtering thresholds are not applied (kept exactly as published)",
            details={"released": True},
        )
    # For raw sources the test sequence of a user is their whole kept history.
    full = splits["test"]
    per_user = full.select(
        "user",
        pl.col("sequence").list.len().alias("total"),
        pl.col("sequence").list.eval((pl.element() < n_a).sum()).list.first().alias("in_a"),
        pl.col("sequence").list.eval((pl.element() >= n_a).sum()).list.first().alias("in_b"),
    )
    per_domain = max(config.min_items_per_domain, 1)
    bad_users = per_user.filter(
        (pl.col("total") < config.min_user_interactions) | (pl.col("in_a") < per_domain) | (pl.col("in_b") < per_domain)
    )
    item_counts = full.select(pl.col("sequence").explode()).group_by("sequence").len()
    bad_items = item_counts.filter(pl.col("len") < config.min_item_interactions)
    problems = []
    if bad_users.height:
        problems.append(f"{bad_users.height} users below the minimums, e.g. {bad_users['user'].head(EXAMPLES).to_list()}")
    if bad_items.height:
        problems.append(f"{bad_items.height} items below {config.min_item_interactions} interactions")
    return CheckOutcome(
        passed=not problems,
        description=(
            f"users >= {config.min_user_interactions} interactions and >= {per_domain} per domain; "
            f"items >= {config.min_item_interactions} interactions"
        ),
        details={
            "users": per_user.height,
            "min_items_in_A": int(per_user["in_a"].min()) if per_user.height else None,
            "min_items_in_B": int(per_user["in_b"].min()) if per_user.height else None,
            "problems": problems,
        },
    )
