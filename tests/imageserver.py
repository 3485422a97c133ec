"""A loopback HTTP server that serves real photos by Open Images-style URL, with injected faults."""

from __future__ import annotations

import hashlib
import http.server
import threading
import time
from collections import Counter
from pathlib import Path

def photo_id(path: Path) -> str:
    """An Open Images-style id that depends on the photo (subject folder and name), not on where it lies."""
    return hashlib.md5(f"{path.parent.name}/{path.name}".encode()).hexdigest()[:16]


class ImageServer:
    """Serves ``/{split}/{image_id}.jpg``; ``faults[image_id]`` picks how that image misbehaves."""

    def __init__(self, photos: dict[str, bytes], slow_seconds: float = 2.0, pace_seconds: float = 0.0):
        self.photos = photos
        self.faults: dict[str, str] = {}
        self.requests: Counter = Counter()
        self.slow_seconds = slow_seconds
        self.pace_seconds = pace_seconds
        self._lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                image_id = Path(self.path).stem
                with server._lock:
                    server.requests[image_id] += 1
                    count = server.requests[image_id]
                server.respond(self, image_id, count)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url_template(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/{{split}}/{{image_id}}.jpg"

    def __enter__(self) -> ImageServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def respond(self, handler: http.server.BaseHTTPRequestHandler, image_id: str, count: int) -> None:
        if self.pace_seconds:
            time.sleep(self.pace_seconds)
        fault = self.faults.get(image_id, "ok")
        body = self.photos.get(image_id)
        if body is None or fault == "404":
            return self._send(handler, 404, b"not found", "text/plain")
        if fault == "always-500" or (fault == "500-then-200" and count == 1):
            return self._send(handler, 500, b"internal error", "text/plain")
        if fault == "slow":
            time.sleep(self.slow_seconds)
        if fault == "html":
            return self._send(handler, 200, b"<!DOCTYPE html><html><body>Access denied</body></html>", "text/html")
        if fault == "html-as-jpeg":
            return self._send(handler, 200, b"<html><head><title>Moved</title></head></html>", "image/jpeg")
        if fault == "not-an-image":
            return self._send(handler, 200, bytes(range(256)) * 64, "image/jpeg")
        if fault == "drop-mid-body" or (fault == "drop-once" and count == 1):
            return self._send(handler, 200, body, "image/jpeg", send=len(body) // 2, close=True)
        if fault == "long-content-length":
            return self._send(handler, 200, body, "image/jpeg", declared=len(body) + 4096, close=True)
        if fault == "short-content-length":
            # Half the photo: a JPEG may carry trailing bytes after its end marker, so cutting only a
            # few kilobytes could leave a complete image.
            return self._send(handler, 200, body, "image/jpeg", declared=len(body) // 2, close=True)
        return self._send(handler, 200, body, "image/jpeg")

    @staticmethod
    def _send(handler, status: int, body: bytes, content_type: str, send: int | None = None,
              declared: int | None = None, close: bool = False) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body) if declared is None else declared))
        if close:
            handler.send_header("Connection", "close")
        handler.end_headers()
        try:
            handler.wfile.write(body if send is None else body[:send])
            handler.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass
        if close:
            handler.close_connection = True
