"""ImageFetcher against a real HTTP server on 127.0.0.1: good, broken and hostile images."""

from __future__ import annotations

import json
import os

import pytest

from cdsr_pipeline.features.images import ImageFetchConfig, ImageFetcher, check_image
from features_support import (
    ImageServer,
    drawn_image,
    fail_first,
    image_bytes,
    png_header_bomb,
    serve,
    serve_slowly,
)

PNG = image_bytes(drawn_image(1), "PNG")
JPEG = image_bytes(drawn_image(2), "JPEG")
BIG_CANVAS = image_bytes(drawn_image(3, size=(1600, 1300)), "PNG")  # 2.08 M pixels, a small file
OVERSIZED = os.urandom(300_000)

# Small limits keep the test fast; the defaults are documented on ImageFetchConfig.
CONFIG = ImageFetchConfig(
    max_bytes=200_000, max_pixels=2_000_000, timeout_s=0.5, retries=2, backoff_s=0.01, concurrency=4
)

ROUTES = {
    "/ok.png": serve(PNG, "image/png"),
    "/ok.jpg": serve(JPEG, "image/jpeg"),
    "/same-as-ok.png": serve(PNG, "image/png"),
    "/truncated.png": serve(PNG[: len(PNG) // 2], "image/png"),
    "/page.html": serve(b"<html><body>Sorry, this product image moved</body></html>", "text/html"),
    "/oversized-declared.jpg": serve(OVERSIZED, "image/jpeg"),
    "/oversized-streamed.jpg": serve(OVERSIZED, "image/jpeg", length=False),
    "/bomb.png": serve(png_header_bomb(), "image/png"),
    "/big-canvas.png": serve(BIG_CANVAS, "image/png"),
    "/gone.png": serve(b"gone", "text/plain", status=404),
    "/slow.png": serve_slowly(PNG, delay_s=2.0),
    "/flaky.png": fail_first(1, PNG),
    "/down.png": fail_first(10_000, PNG),
}

EXPECTED = {
    "/ok.png": ("ok", None),
    "/ok.jpg": ("ok", None),
    "/same-as-ok.png": ("ok", None),
    "/truncated.png": ("rejected", "corrupt_image"),
    "/page.html": ("rejected", "not_an_image"),
    "/oversized-declared.jpg": ("rejected", "too_large"),
    "/oversized-streamed.jpg": ("rejected", "too_large"),
    "/bomb.png": ("rejected", "decompression_bomb"),
    "/big-canvas.png": ("rejected", "decompression_bomb"),
    "/missing-route.png": ("rejected", "http_404"),
    "/gone.png": ("rejected", "http_404"),
    "/slow.png": ("failed", "timeout"),
    "/flaky.png": ("ok", None),
    "/down.png": ("failed", "http_500"),
}


@pytest.fixture(scope="module")
def server():
    with ImageServer(ROUTES).running() as running:
        yield running


def test_every_case_gets_its_outcome_and_reason(server, tmp_path):
    urls = {path: server.url(path) for path in EXPECTED}
    with ImageFetcher(tmp_path, CONFIG) as fetcher:
        sources = fetcher.resolve(urls.values(), progress=False)

    outcomes = {path: (sources[url].status, sources[url].reason) for path, url in urls.items()}
    assert outcomes == EXPECTED
    ok = sources[urls["/ok.png"]]
    assert ok.path == tmp_path / "images" / ok.sha256 and ok.path.read_bytes() == PNG
    # Content addressing: two URLs with the same bytes share one stored file.
    assert sources[urls["/same-as-ok.png"]].path == ok.path
    assert server.hits["/flaky.png"] == 2  # a 500, then a retry that succeeded
    assert server.hits["/down.png"] == 1 + CONFIG.retries
    assert server.hits["/gone.png"] == 1  # 4xx is not retried
    # Rejected bytes are not kept: the store holds the three good images and the index.
    stored = sorted(p.name for p in (tmp_path / "images").iterdir())
    assert len(stored) == 3 and "index.jsonl" in stored


def test_second_run_refetches_only_failures(server, tmp_path):
    urls = [server.url(path) for path in ("/ok.png", "/page.html", "/gone.png", "/down.png")]
    with ImageFetcher(tmp_path, CONFIG) as fetcher:
        fetcher.resolve(urls, progress=False)
    before = dict(server.hits)

    with ImageFetcher(tmp_path, CONFIG) as fetcher:  # a new run reads the index from disk
        again = fetcher.resolve(urls, progress=False)

    fetched_again = {path for path in server.hits if server.hits[path] > before.get(path, 0)}
    assert fetched_again == {"/down.png"}
    assert [again[url].remembered for url in urls] == [True, True, True, False]
    assert again[urls[1]].reason == "not_an_image"

    with ImageFetcher(tmp_path, ImageFetchConfig(**{**CONFIG.__dict__, "retry_rejected": True})) as fetcher:
        fetcher.resolve(urls, progress=False)
    assert server.hits["/page.html"] == before["/page.html"] + 1
    assert server.hits["/ok.png"] == before["/ok.png"]


def test_deleted_store_file_is_fetched_again(server, tmp_path):
    url = server.url("/ok.jpg")
    with ImageFetcher(tmp_path, CONFIG) as fetcher:
        first = fetcher.resolve([url], progress=False)[url]
    first.path.unlink()
    hits = server.hits["/ok.jpg"]
    with ImageFetcher(tmp_path, CONFIG) as fetcher:
        second = fetcher.resolve([url], progress=False)[url]
    assert second.status == "ok" and second.path.read_bytes() == JPEG
    assert server.hits["/ok.jpg"] == hits + 1


def test_local_files_are_checked_and_remembered_until_they_change(tmp_path):
    images = tmp_path / "pictures"
    images.mkdir()
    (images / "a.png").write_bytes(PNG)
    (images / "broken.jpg").write_bytes(JPEG[:100])
    absolute = str(images / "a.png")
    config = ImageFetchConfig(**{**CONFIG.__dict__, "local_root": str(tmp_path)})
    refs = [
        absolute,
        "pictures/a.png",
        (images / "a.png").as_uri(),
        "pictures/broken.jpg",
        "pictures/none.png",
        "s3://bucket/x.png",
    ]

    with ImageFetcher(tmp_path / "cache", config) as fetcher:
        sources = fetcher.resolve(refs, progress=False)
    assert [(sources[r].status, sources[r].reason) for r in refs] == [
        ("ok", None),
        ("ok", None),
        ("ok", None),
        ("rejected", "corrupt_image"),
        ("failed", "file_not_found"),
        ("rejected", "unsupported_ref"),
    ]
    assert sources[absolute].path == images / "a.png"  # local files are read in place

    (images / "broken.jpg").write_bytes(JPEG)  # fixed: size and mtime change
    with ImageFetcher(tmp_path / "cache", config) as fetcher:
        again = fetcher.resolve(refs, progress=False)
    assert again[absolute].remembered
    assert again["pictures/broken.jpg"].status == "ok" and not again["pictures/broken.jpg"].remembered


def test_index_survives_a_torn_last_line(tmp_path):
    (tmp_path / "images").mkdir()
    index = tmp_path / "images" / "index.jsonl"
    good = {
        "ref": "https://example.invalid/x.png",
        "status": "rejected",
        "reason": "http_404",
        "sha256": None,
    }
    index.write_text(json.dumps(good) + "\n" + '{"ref": "https://exa')
    with ImageFetcher(tmp_path, CONFIG) as fetcher:
        source = fetcher.resolve([good["ref"]], progress=False)[good["ref"]]
    assert source.remembered and source.reason == "http_404"
    assert index.read_text() == json.dumps({**good, "size": None, "mtime_ns": None}) + "\n"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (PNG, None),
        (JPEG, None),
        (b"", "not_an_image"),
        (JPEG[: len(JPEG) // 2], "corrupt_image"),
        (png_header_bomb(), "decompression_bomb"),
        (BIG_CANVAS, "decompression_bomb"),
    ],
)
def test_check_image(data, reason):
    assert check_image(data, max_pixels=2_000_000) == reason


def test_pil_bomb_warning_counts_as_a_bomb():
    # Above PIL's warning threshold (~89 M pixels) but under its error threshold and our limit.
    assert check_image(png_header_bomb(10_000, 10_000), max_pixels=10**9) == "decompression_bomb"
