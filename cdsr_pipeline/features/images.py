"""Item images from local paths or URLs, checked and cached by content.

:class:`ImageFetcher` turns each ``ITEMS.image_ref`` into an :class:`ImageSource`:
``ok`` with the sha256 of the image bytes and a file to read them from, or
``rejected`` / ``failed`` with a short reason code.

- URLs (``http``/``https``) are downloaded with bounded concurrency, a time limit per
  request, a byte limit, and retries with exponential backoff for transient trouble.
  Good bytes go to a content-addressed store ``<cache_dir>/images/<sha256>``.
- Local files (absolute paths, ``file://`` URLs, or paths relative to
  ``ImageFetchConfig.local_root``) are read where they are, not copied.
- Every image is checked before it is accepted: it must decode completely with
  PIL, stay under ``max_bytes``, and have at most ``max_pixels`` pixels (a small
  file that declares a huge canvas is a decompression bomb; PIL's own
  ``DecompressionBombError``/``Warning`` count the same way).

What is remembered between runs (``<cache_dir>/images/index.jsonl``, one JSON line
per outcome, appended as results arrive, the last line per ref wins):

- ``ok``: the ref's content hash, so a rerun neither downloads nor decodes again.
- ``rejected``: the server gave a definite answer that will not improve by asking
  again: content that is not a decodable image, too large, a decompression bomb, or
  an HTTP 4xx other than 408/429 (404 and 410 on dead product links above all).
  Re-fetching these on every run would cost one request per dead link for nothing;
  ``retry_rejected=True`` checks them again (a site that fixed its images).
- ``failed`` is never remembered: timeouts, connection errors, HTTP 5xx/408/429,
  missing local files. They are retried ``retries`` times within the run and tried
  again on the next run.

Local files are remembered with their size and mtime and checked again when either
changes. Rejected bytes are not kept in the content store.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlparse

import httpx
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from cdsr_pipeline.settings import setting
from cdsr_pipeline.storage import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)

Status = Literal["ok", "rejected", "failed"]

INDEX_NAME = "index.jsonl"


@dataclass(frozen=True)
class ImageFetchConfig:
    """Limits and behaviour of :class:`ImageFetcher`.

    Attributes:
        max_bytes: largest accepted image file (default 16 MiB).
        max_pixels: largest accepted width x height (default 25 M, below PIL's own
            warning threshold of about 89 M). Also bounds the memory of one decoded
            image (3 bytes per pixel).
        timeout_s: limit for one whole HTTP request: connect, headers and body.
        retries: further attempts after a transient failure, within one run.
        backoff_s: wait before the first retry; doubles with each further one.
        concurrency: downloads in flight at once.
        local_root: folder that relative local paths are resolved against
            (default: the current directory).
        retry_rejected: fetch refs again that an earlier run rejected.
        user_agent: sent with every request.
    """

    max_bytes: int = setting(16 * 1024 * 1024, "Largest accepted image file.")
    max_pixels: int = setting(25_000_000, "Largest accepted width x height (decompression bombs).")
    timeout_s: float = setting(20.0, "Limit for one HTTP request.")
    retries: int = setting(2, "Further attempts after a transient failure.")
    backoff_s: float = 1.0
    concurrency: int = setting(8, "Downloads in flight at once.")
    local_root: str | None = None
    retry_rejected: bool = setting(False, "Fetch again images an earlier run rejected.")
    user_agent: str = "cdsr-pipeline item-image fetcher"


@dataclass(frozen=True)
class ImageSource:
    """The outcome for one image ref.

    ``path`` is the file holding the bytes (the content store for URLs, the file
    itself for local refs) and ``sha256`` their hash; both are set exactly when
    ``status`` is ``ok`` (``sha256`` may also be set for rejected content).
    ``remembered`` tells that the outcome came from the index of an earlier run.
    """

    ref: str
    status: Status
    reason: str | None = None
    sha256: str | None = None
    path: Path | None = None
    remembered: bool = False


@dataclass
class _IndexEntry:
    ref: str
    status: Status
    reason: str | None = None
    sha256: str | None = None
    size: int | None = None  # local files only, with mtime_ns: the entry's validity check
    mtime_ns: int | None = None


def check_image(data: bytes, max_pixels: int) -> str | None:
    """``None`` when ``data`` is a complete, decodable image within ``max_pixels``, else the reason.

    Runs in the calling thread: the warnings filter that turns PIL's
    DecompressionBombWarning into an error is process-wide, so the fetcher calls
    this from one thread only.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > max_pixels:
                    return "decompression_bomb"
                image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            return "decompression_bomb"
        except UnidentifiedImageError:
            return "not_an_image"
        except (OSError, SyntaxError, ValueError, EOFError):
            # Truncated files ("image file is truncated"), broken chunks, bad headers.
            return "corrupt_image"
    return None


@dataclass(frozen=True)
class _Download:
    status: Status
    data: bytes | None = None
    reason: str | None = None


class ImageFetcher:
    """Resolves image refs into checked, content-addressed image files.

    Use as a context manager (it holds an HTTP connection pool)::

        with ImageFetcher(cache_dir, ImageFetchConfig()) as fetcher:
            sources = fetcher.resolve(refs)
    """

    def __init__(self, cache_dir: str | os.PathLike[str], config: ImageFetchConfig | None = None):
        self.config = config or ImageFetchConfig()
        self.store = Path(cache_dir) / "images"
        self.store.mkdir(parents=True, exist_ok=True)
        self._index_path = self.store / INDEX_NAME
        self._index = self._load_index()
        self._index_file = self._index_path.open("a", encoding="utf-8")
        self._client = httpx.Client(
            timeout=httpx.Timeout(self.config.timeout_s),
            follow_redirects=True,
            headers={"User-Agent": self.config.user_agent},
            limits=httpx.Limits(max_connections=self.config.concurrency),
        )

    def __enter__(self) -> ImageFetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()
        self._index_file.close()

    # -- public ---------------------------------------------------------------
    def resolve(self, refs: Iterable[str], *, progress: bool = True) -> dict[str, ImageSource]:
        """Outcome per distinct ref (stripped); downloads only what no earlier run settled."""
        results: dict[str, ImageSource] = {}
        to_download: list[str] = []
        for ref in dict.fromkeys(r.strip() for r in refs):
            url = urlparse(ref)
            if url.scheme in ("http", "https"):
                remembered = self._remembered_url(ref)
                if remembered is not None:
                    results[ref] = remembered
                else:
                    to_download.append(ref)
            elif url.scheme == "file":
                results[ref] = self._resolve_local(ref, Path(unquote(url.path)))
            elif url.scheme == "":
                results[ref] = self._resolve_local(ref, self._local_path(ref))
            else:
                results[ref] = self._settle(ref, "rejected", "unsupported_ref")
        results.update(self._download_all(to_download, progress=progress))
        return results

    # -- URLs -----------------------------------------------------------------
    def _remembered_url(self, ref: str) -> ImageSource | None:
        entry = self._index.get(ref)
        if entry is None or (entry.status == "rejected" and self.config.retry_rejected):
            return None
        if entry.status == "ok":
            path = self.store / str(entry.sha256)
            if not path.is_file():  # content store cleaned up: fetch again
                return None
            return ImageSource(ref, "ok", sha256=entry.sha256, path=path, remembered=True)
        return ImageSource(ref, entry.status, entry.reason, entry.sha256, remembered=True)

    def _download_all(self, urls: Sequence[str], *, progress: bool) -> dict[str, ImageSource]:
        """Downloads in worker threads; checking and storing in this thread, as results come in.

        At most ``2 * concurrency`` downloads are pending at once, so the bytes held
        in memory stay bounded however many URLs there are.
        """
        results: dict[str, ImageSource] = {}
        if not urls:
            return results
        window = 2 * self.config.concurrency
        queue = iter(urls)
        pending: dict[Future[_Download], str] = {}
        with (
            ThreadPoolExecutor(self.config.concurrency, thread_name_prefix="image-fetch") as pool,
            tqdm(total=len(urls), desc="fetch images", unit="img", disable=not progress) as bar,
        ):
            while True:
                for url in queue:
                    pending[pool.submit(self._download, url)] = url
                    if len(pending) >= window:
                        break
                if not pending:
                    break
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    url = pending.pop(future)
                    results[url] = self._accept(url, future.result())
                    bar.update()
        return results

    def _download(self, url: str) -> _Download:
        attempt = 0
        while True:
            outcome = self._get_once(url)
            if outcome.status != "failed" or attempt >= self.config.retries:
                return outcome
            time.sleep(self.config.backoff_s * 2**attempt)
            attempt += 1

    def _get_once(self, url: str) -> _Download:
        limit = self.config.max_bytes
        deadline = time.monotonic() + self.config.timeout_s
        try:
            with self._client.stream("GET", url) as response:
                code = response.status_code
                if code in (408, 429) or code >= 500:
                    return _Download("failed", reason=f"http_{code}")
                if code >= 400:
                    return _Download("rejected", reason=f"http_{code}")
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > limit:
                    return _Download("rejected", reason="too_large")
                body = bytearray()
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > limit:
                        return _Download("rejected", reason="too_large")
                    if time.monotonic() > deadline:  # a server that trickles bytes
                        return _Download("failed", reason="timeout")
                return _Download("ok", data=bytes(body))
        except httpx.TimeoutException:
            return _Download("failed", reason="timeout")
        except httpx.RequestError as error:
            return _Download("failed", reason=f"transport_error:{type(error).__name__}")
        except httpx.InvalidURL:
            return _Download("rejected", reason="invalid_url")

    def _accept(self, url: str, download: _Download) -> ImageSource:
        if download.status != "ok":
            return self._settle(url, download.status, download.reason)
        data = download.data or b""
        sha256 = hashlib.sha256(data).hexdigest()
        reason = check_image(data, self.config.max_pixels)
        if reason is not None:
            return self._settle(url, "rejected", reason, sha256=sha256)
        path = self.store / sha256
        if not path.is_file():
            atomic_write_bytes(path, data)
        return self._settle(url, "ok", sha256=sha256, path=path)

    # -- local files ----------------------------------------------------------
    def _local_path(self, ref: str) -> Path:
        path = Path(ref).expanduser()
        if not path.is_absolute():
            path = Path(self.config.local_root or Path.cwd()) / path
        return path

    def _resolve_local(self, ref: str, path: Path) -> ImageSource:
        if not path.is_file():
            return self._settle(ref, "failed", "file_not_found")
        stat = path.stat()
        entry = self._index.get(ref)
        if entry is not None and (entry.size, entry.mtime_ns) == (stat.st_size, stat.st_mtime_ns):
            if entry.status == "ok":
                return ImageSource(ref, "ok", sha256=entry.sha256, path=path, remembered=True)
            if not self.config.retry_rejected:
                return ImageSource(ref, entry.status, entry.reason, entry.sha256, remembered=True)
        file_state = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        if stat.st_size > self.config.max_bytes:
            return self._settle(ref, "rejected", "too_large", **file_state)
        data = path.read_bytes()
        sha256 = hashlib.sha256(data).hexdigest()
        reason = check_image(data, self.config.max_pixels)
        if reason is not None:
            return self._settle(ref, "rejected", reason, sha256=sha256, **file_state)
        return self._settle(ref, "ok", sha256=sha256, path=path, **file_state)

    # -- the index ------------------------------------------------------------
    def _settle(
        self,
        ref: str,
        status: Status,
        reason: str | None = None,
        *,
        sha256: str | None = None,
        path: Path | None = None,
        size: int | None = None,
        mtime_ns: int | None = None,
    ) -> ImageSource:
        """Record an outcome (ok and rejected ones persist; failures do not) and return it."""
        if status == "ok":
            log.debug("image ok: %s", ref)
        else:
            log.warning("image %s (%s): %s", status, reason, ref)
        if status != "failed":
            entry = _IndexEntry(ref, status, reason, sha256, size, mtime_ns)
            self._index[ref] = entry
            self._index_file.write(json.dumps(asdict(entry)) + "\n")
            self._index_file.flush()  # a crash keeps every outcome settled so far
        return ImageSource(ref, status, reason, sha256, path)

    def _load_index(self) -> dict[str, _IndexEntry]:
        """Last entry per ref. All outcomes are settled in the main thread, one line each.

        The file is rewritten without superseded lines once they are the majority,
        and without a torn last line (a crash mid-write), which the next append
        would otherwise extend into a second unreadable line.
        """
        entries: dict[str, _IndexEntry] = {}
        try:
            text = self._index_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return entries
        lines = text.splitlines()
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
                entries[record["ref"]] = _IndexEntry(**record)
            except (json.JSONDecodeError, KeyError, TypeError):
                log.warning("skipping unreadable line %d of %s", number, self._index_path)
        if lines and (len(lines) > 2 * len(entries) or not text.endswith("\n")):
            atomic_write_text(
                self._index_path, "".join(json.dumps(asdict(e)) + "\n" for e in entries.values())
            )
        return entries
