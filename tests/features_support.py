"""Test helpers shared by ``test_features_*.py``: a tiny random CLIP, generated images, an image server.

Nothing here is a mock: the tiny CLIP is a real open_clip model (random weights,
saved to a file and loaded through the product's checkpoint path), the images are
real PNG/JPEG files drawn with PIL, and the server is a real HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import io
import struct
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from PIL import Image, ImageDraw

FIXTURES = Path(__file__).parent / "fixtures"
# Registered with open_clip under the file's stem; the name says what it is.
TINY_CLIP_CONFIG = FIXTURES / "tiny-random-clip-test.json"
TINY_CLIP_MODEL = TINY_CLIP_CONFIG.stem


def write_tiny_clip_checkpoint(path: Path, seed: int = 0) -> Path:
    """A randomly initialized tiny open_clip model's state dict, saved to ``path``."""
    import open_clip
    import torch

    if TINY_CLIP_MODEL not in open_clip.list_models():
        open_clip.add_model_config(TINY_CLIP_CONFIG)
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_CLIP_MODEL, pretrained=None)
    torch.save(model.state_dict(), path)
    return path


def drawn_image(seed: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    """A small RGB picture (background colour and a shape chosen by ``seed``)."""
    palette = [(220, 40, 40), (40, 160, 60), (40, 70, 200), (230, 200, 30), (120, 40, 160), (30, 30, 30)]
    image = Image.new("RGB", size, palette[seed % len(palette)])
    draw = ImageDraw.Draw(image)
    x, y = (seed * 7) % (size[0] // 2), (seed * 5) % (size[1] // 2)
    draw.ellipse((x, y, x + size[0] // 2, y + size[1] // 2), fill=palette[(seed + 3) % len(palette)])
    return image


def image_bytes(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def png_header_bomb(width: int = 30_000, height: int = 30_000) -> bytes:
    """A few hundred bytes of PNG declaring a ``width`` x ``height`` canvas (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 4096))
        + chunk(b"IEND", b"")
    )


# A route gets the request handler and the hit count of its path, and answers (status, headers, body).
Route = Callable[[BaseHTTPRequestHandler, int], tuple[int, dict[str, str], bytes]]


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients that hang up early (size limit, timeout) are part of the tests


class ImageServer:
    """An HTTP server on 127.0.0.1 (random port) serving fixed routes; counts hits per path."""

    def __init__(self, routes: dict[str, Route]):
        self.routes = routes
        self.hits: Counter[str] = Counter()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                server.hits[self.path] += 1
                route = server.routes.get(self.path)
                if route is None:
                    self.send_error(404)
                    return
                status, headers, body = route(self, server.hits[self.path])
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

        self._httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def url(self, path: str) -> str:
        return self.base + path

    @contextmanager
    def running(self) -> Iterator[ImageServer]:
        thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._httpd.shutdown()
            self._httpd.server_close()


def serve(body: bytes, content_type: str, *, length: bool = True, status: int = 200) -> Route:
    headers = {"Content-Type": content_type}
    if length:
        headers["Content-Length"] = str(len(body))
    return lambda handler, hit: (status, headers, body)


def serve_slowly(body: bytes, delay_s: float) -> Route:
    def route(handler: BaseHTTPRequestHandler, hit: int) -> tuple[int, dict[str, str], bytes]:
        time.sleep(delay_s)
        return 200, {"Content-Type": "image/png", "Content-Length": str(len(body))}, body

    return route


def fail_first(times: int, body: bytes) -> Route:
    """HTTP 500 for the first ``times`` hits, then the image."""

    def route(handler: BaseHTTPRequestHandler, hit: int) -> tuple[int, dict[str, str], bytes]:
        if hit <= times:
            return 500, {"Content-Length": "0"}, b""
        return 200, {"Content-Type": "image/png", "Content-Length": str(len(body))}, body

    return route
