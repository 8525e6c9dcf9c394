"""The Dagster UI and the HTML report as a person sees them, in headless Chromium.

Debian's ``chromium`` and ``chromium-driver`` (``make browser`` installs them; nothing
downloads a browser at run time), driven by selenium. ``dagster dev`` (webserver and
daemon, which launches the runs the UI queues) serves the project's definitions on
127.0.0.1 with a storage of its own, on the bundled demo data. Screenshots are written
to ``storage/screenshots/`` so a person can look at what the tests saw.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (CHROMIUM and CHROMEDRIVER),
        reason="Debian's chromium and chromium-driver are not installed (make browser)",
    ),
]

REPO = Path(__file__).resolve().parents[1]
SCREENSHOTS = REPO / "storage" / "screenshots"
# Chromium as root in a closed network: no sandbox, and none of the background
# connections it would otherwise keep trying (they are refused here, many at a time).
CHROMIUM_FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1600,2400",
)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def dagster_ui(tmp_path_factory):
    """``dagster dev`` on 127.0.0.1 with its own DAGSTER_HOME and storage; yields its base URL."""
    root = tmp_path_factory.mktemp("ui")
    home = root / "dagster"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    port = _free_port()
    env = {**os.environ, "DAGSTER_HOME": str(home), "CDSR_STORAGE": str(root / "storage")}
    log = (root / "dagster-dev.log").open("wb")
    dagster = Path(sys.executable).with_name("dagster")
    server = subprocess.Popen(
        [str(dagster), "dev", "-h", "127.0.0.1", "-p", str(port), "-w", "workspace.yaml"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{base}/server_info", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dagster dev did not start: {(root / 'dagster-dev.log').read_text()[-2000:]}")
            time.sleep(1)
        yield base
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


def _body(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.TAG_NAME, "body").text


def _open(driver, url: str, *expected: str, timeout: float = 60) -> str:
    """Load ``url`` and wait until the page's text shows every ``expected`` string
    (the UI renders after its data arrives)."""
    driver.get(url)
    return _wait_for(driver, *expected, timeout=timeout)


def _wait_for(driver, *expected: str, timeout: float = 60) -> str:
    """Wait until the page's text shows every ``expected`` string; dismisses Dagster's first-visit dialog."""
    from selenium.webdriver.common.by import By

    url = driver.current_url
    deadline = time.monotonic() + timeout
    while True:
        for skip in driver.find_elements(By.XPATH, "//button[normalize-space()='Skip']"):
            skip.click()
        text = _body(driver)
        missing = [s for s in expected if s not in text]
        if not missing:
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"{url}: never showed {missing}; the page showed: {text[:1500]}")
        time.sleep(1)


def _shot(driver, name: str) -> None:
    driver.save_screenshot(str(SCREENSHOTS / f"{name}.png"))


def _materialize_from_the_ui(driver, base: str, asset: str, *shows: str, timeout: float = 300) -> str:
    """Press the asset page's Materialize button, wait for the run to finish and the
    asset page to show ``shows`` (its metadata); the page's text."""
    from selenium.webdriver.common.by import By

    _open(driver, f"{base}/assets/{asset}", "Never materialized", "Materialize")
    from selenium.common.exceptions import ElementClickInterceptedException

    for _ in range(20):  # Dagster's first-visit dialog may open over the page a moment after it loads
        try:
            driver.find_element(By.XPATH, "//button[normalize-space()='Materialize']").click()
            break
        except ElementClickInterceptedException:
            for skip in driver.find_elements(By.XPATH, "//button[normalize-space()='Skip']"):
                skip.click()
            time.sleep(0.5)
    deadline = time.monotonic() + 30
    while "Launched run" not in _body(driver):
        # an asset whose upstream is partly unmaterialized (the report: the models not trained yet) asks first
        for confirm in driver.find_elements(By.XPATH, "//button[normalize-space()='Confirm']"):
            confirm.click()
        if time.monotonic() > deadline:
            raise AssertionError(f"{asset}: no run launched; the page showed: {_body(driver)[:1500]}")
        time.sleep(0.5)
    deadline = time.monotonic() + timeout
    while True:  # reloaded until the run's materialization and its metadata are shown
        text = _open(driver, f"{base}/assets/{asset}", "Latest materialization")
        if "Never materialized" not in text and all(s in text for s in shows):
            return text
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{asset}: the run launched from the UI did not materialize it with {shows} shown in {timeout:.0f} s; "
                f"the page showed: {text[:4000]}"
            )
        time.sleep(3)


def test_the_asset_graph_shows_every_asset_and_every_check(dagster_ui, browser):
    from cdsr_pipeline.definitions import defs

    graph = defs.resolve_asset_graph()
    groups: dict[str, list[str]] = {}
    for key in graph.get_all_asset_keys():
        groups.setdefault(graph.get(key).group_name, []).append(key.path[-1])
    for group, assets in sorted(groups.items()):
        _open(browser, f'{dagster_ui}/asset-groups~group:"{group}"', *assets)
        _shot(browser, f"lineage-{group}")
    checks: dict[str, list[str]] = {}
    for check in graph.asset_check_keys:
        checks.setdefault(check.asset_key.path[-1], []).append(check.name)
    for asset, names in sorted(checks.items()):
        _open(browser, f"{dagster_ui}/assets/{asset}?view=checks", f"Checks ({len(names)})", *names)
    _shot(browser, "checks-" + sorted(checks)[-1])


def test_materializations_launched_from_the_ui_succeed_and_their_metadata_renders(dagster_ui, browser):
    _materialize_from_the_ui(browser, dagster_ui, "raw_interactions", "lines_read", "quarantine_share")
    # the papers' Table 1, rendered from the asset's metadata
    _materialize_from_the_ui(browser, dagster_ui, "cdsr_sequences", "Dataset: llmcdsr-food-kitchen-sample", "Avg.length")
    _shot(browser, "cdsr_sequences-materialized")
    _materialize_from_the_ui(browser, dagster_ui, "popularity_model", "test MRR")
    # the report's markdown in the asset's metadata, opened as a person does: the model trained, the missing listed
    from selenium.webdriver.common.by import By

    _materialize_from_the_ui(browser, dagster_ui, "evaluation_report", "missing_model_assets", "Show Markdown")
    browser.find_element(By.XPATH, "//*[text()[contains(., 'Show Markdown')]]").click()
    _wait_for(browser, "Results:", "Popularity", "Not in this report")
    _shot(browser, "evaluation_report-markdown")


def test_the_report_page_shows_its_tables_and_every_learning_curve_loads(browser, tmp_path):
    import dataclasses

    from model_synthetic import write_synthetic_features, write_synthetic_sequences
    from selenium.webdriver.common.by import By

    from cdsr_pipeline.model import PRESETS, TrainConfig, train_model
    from cdsr_pipeline.report import write_report

    sequences = write_synthetic_sequences(tmp_path / "sequences", names=("Food", "Kitchen"))
    features = write_synthetic_features(tmp_path / "features", num_items=50)
    runs = []
    for preset in ("sasrec", "tema_llm"):
        model = dataclasses.replace(PRESETS[preset], hidden_dim=16)
        config = TrainConfig(model=model, name=preset, epochs=2, num_negatives=20, num_threads=1, progress=False)
        runs.append(train_model(sequences, features, config, tmp_path / preset))
    paths = write_report(runs, tmp_path / "report")
    browser.get(paths.html.as_uri())
    tables = browser.find_elements(By.TAG_NAME, "table")
    assert len(tables) >= 4 and all(t.find_elements(By.TAG_NAME, "td") for t in tables)
    images = browser.find_elements(By.TAG_NAME, "img")
    assert len(images) == len(paths.figures) >= 3
    for image in images:
        loaded = browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", image)
        assert loaded, f"{image.get_attribute('src')} did not load"
    _shot(browser, "report")
