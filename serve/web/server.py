"""The phone-browser demo's server: the page, one bundle, its metadata and LiteRT.js. Standard library only.

`pipeline serve-web` runs it. The page does the inference in the browser; this only hands out files, to any
phone on the network: so it sends no provenance (training config, paths), and no client can starve the others.
One thread reads every connection's request line and headers at once (a selector), each request's head must be
complete within REQUEST_DEADLINE_SECONDS of its connection however slowly it trickles in, an address holds at
most MAX_CONNECTIONS_PER_CLIENT connections, and only complete requests reach the pool of threads that answer.
"""

from __future__ import annotations

import io
import json
import os
import selectors
import shlex
import socket
import struct
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler

from serve.bundle import read_bundle
from serve.errors import BundleError, PipelineError
from serve.tflite_flatbuffer import input_shape_signatures

WEB_DIR = os.path.dirname(os.path.abspath(__file__))
LITERT_DIR = os.path.join(WEB_DIR, "node_modules", "@litertjs")
STATIC = {"/": "index.html", "/index.html": "index.html", "/app.js": "app.js"}
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript", ".wasm": "application/wasm"}
WORKER_THREADS = 8  # requests answered at once
REQUEST_DEADLINE_SECONDS = 10  # the request line and headers must be in within this long of the connection
MAX_HEAD_BYTES = 64 * 1024  # the request line and headers, at most
MAX_CONNECTIONS_PER_CLIENT = 16  # open connections from one address; a browser opens about 6 to a site
MAX_CONNECTIONS = 512  # open connections in all; beyond either limit a new connection is closed at once
SEND_TIMEOUT_SECONDS = 10  # an answer whose client takes nothing for this long is dropped


def check_litert() -> None:
    """LiteRT.js comes from npm into serve/web/node_modules; say how to get it when it is missing, into the folder
    this server reads (site-packages for a non-editable install, not serve/web under the current folder)."""
    if not os.path.isfile(os.path.join(LITERT_DIR, "core", "dist", "index.js")):
        raise PipelineError(f"LiteRT.js is not installed; run: npm ci --prefix {shlex.quote(WEB_DIR)}")


def check_fixed_batch(model_path: str, model: bytes) -> None:
    """LiteRT.js takes an input's shape signature as its type and cannot resize: a batch of -1 (bundles exported
    before batch-1 signatures) refuses every image. Say so now rather than in the phone's browser."""
    try:
        signatures = input_shape_signatures(model)
    except (ValueError, struct.error) as err:
        raise BundleError(f"{model_path}: corrupt TFLite flatbuffer ({err})") from None
    for signature in signatures:
        if -1 in signature:
            raise BundleError(
                f"{model_path}: its input shape is {signature}, with an open (-1) dimension that LiteRT.js refuses; "
                "export the bundle again (pipeline quantize) to fix the batch at 1"
            )


def request_path(target: str) -> str | None:
    """The path of a request target (as http.server gives it: the request line's bytes as latin-1), its
    %-escapes decoded as UTF-8; None for bytes no file name can hold: invalid UTF-8, NUL or other controls."""
    raw = urllib.parse.unquote_to_bytes(target.split("?", 1)[0].encode("latin-1"))
    try:
        path = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return None if any(ord(c) < 0x20 or ord(c) == 0x7F for c in path) else path


class HeadHandler(BaseHTTPRequestHandler):
    """A handler for a request whose head the server has read already: `request` is (connection, head)."""

    def setup(self) -> None:
        self.connection, head = self.request
        self.rfile = io.BytesIO(head)  # a GET has no body: the head is the whole request
        self.wfile = self.connection.makefile("wb")


class _Pending:
    """A connection whose request head is still coming in."""

    __slots__ = ("client", "deadline", "head")

    def __init__(self, client: tuple, deadline: float) -> None:
        self.client, self.deadline, self.head = client, deadline, bytearray()


def _head_end(head: bytearray, searched: int) -> bool:
    """Whether `head` holds the blank line that ends a request head; its first `searched` bytes held none."""
    start = max(searched - 3, 0)
    return head.find(b"\n\r\n", start) >= 0 or head.find(b"\n\n", start) >= 0


class WebServer:
    """Serves `handler` (a HeadHandler) on `address`: heads read by one selector thread, answers by a pool."""

    def __init__(self, address: tuple[str, int], handler: type[HeadHandler]) -> None:
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        try:  # not socket.create_server: its errors append the address to the reason
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait
            self.socket.bind(address)
            self.socket.listen(128)
        except OSError:
            self.socket.close()
            raise
        self.server_address = self.socket.getsockname()
        self.handler = handler
        self._pool = ThreadPoolExecutor(WORKER_THREADS, thread_name_prefix="serve-web")
        self._pending: dict[socket.socket, _Pending] = {}  # in the order accepted: the earliest deadline first
        self._open: dict[str, int] = {}  # open connections per client address
        self._open_in_all = 0
        self._lock = threading.Lock()  # over the counts: answers end in the pool's threads
        self._stop = threading.Event()

    def serve_forever(self) -> None:
        """Accept, read heads and hand complete requests to the pool until `shutdown`."""
        self.socket.setblocking(False)
        with selectors.DefaultSelector() as selector:
            selector.register(self.socket, selectors.EVENT_READ)
            while not self._stop.is_set():
                first = next(iter(self._pending.values()), None)
                wait = 0.5 if first is None else min(max(first.deadline - time.monotonic(), 0), 0.5)
                for key, _ in selector.select(wait):
                    if key.fileobj is self.socket:
                        self._accept(selector)
                    else:
                        self._read(selector, key.fileobj, key.data)
                self._expire(selector)

    def _expire(self, selector: selectors.BaseSelector) -> None:
        """Drop the connections whose head did not arrive in time: the oldest, which come first."""
        now = time.monotonic()
        while self._pending:
            connection, pending = next(iter(self._pending.items()))
            if pending.deadline > now:
                return
            self._drop(selector, connection)

    def _accept(self, selector: selectors.BaseSelector) -> None:
        while True:
            try:
                connection, client = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # out of file descriptors, say (MAX_CONNECTIONS stays below the usual 1024)
                time.sleep(0.1)  # while some close: the listening socket stays ready, and would spin
                return
            with self._lock:
                count = self._open.get(client[0], 0)
                full = count >= MAX_CONNECTIONS_PER_CLIENT or self._open_in_all >= MAX_CONNECTIONS
                if not full:
                    self._open[client[0]] = count + 1
                    self._open_in_all += 1
            if full:
                connection.close()  # a browser retries; a flood is cut short
                continue
            connection.setblocking(False)
            pending = _Pending(client, time.monotonic() + REQUEST_DEADLINE_SECONDS)
            self._pending[connection] = pending
            selector.register(connection, selectors.EVENT_READ, pending)

    def _read(self, selector: selectors.BaseSelector, connection: socket.socket, pending: _Pending) -> None:
        try:
            data = connection.recv(MAX_HEAD_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        searched = len(pending.head)
        pending.head += data
        if data and _head_end(pending.head, searched):
            selector.unregister(connection)
            del self._pending[connection]
            self._pool.submit(self._answer, connection, pending)
        elif not data or len(pending.head) > MAX_HEAD_BYTES:  # gone, or a head too long to be a browser's
            self._drop(selector, connection)

    def _answer(self, connection: socket.socket, pending: _Pending) -> None:
        try:
            connection.settimeout(SEND_TIMEOUT_SECONDS)
            self.handler((connection, bytes(pending.head)), pending.client, self)
        except Exception:
            self.handle_error(pending.client)
        finally:
            try:
                connection.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            self._close(connection, pending)

    def _drop(self, selector: selectors.BaseSelector, connection: socket.socket) -> None:
        """Close a connection whose head is still coming in."""
        selector.unregister(connection)
        self._close(connection, self._pending.pop(connection))

    def _close(self, connection: socket.socket, pending: _Pending) -> None:
        connection.close()
        with self._lock:
            self._open_in_all -= 1
            left = self._open[pending.client[0]] - 1
            if left:
                self._open[pending.client[0]] = left
            else:
                del self._open[pending.client[0]]

    def handle_error(self, client: tuple) -> None:
        """A client that goes away mid-answer is normal on a phone; anything else is one line, no traceback."""
        error = sys.exc_info()[1]
        if not isinstance(error, (ConnectionError, TimeoutError)):
            print(f"serve-web: {client[0]}: {type(error).__name__}: {error}", file=sys.stderr)

    def shutdown(self) -> None:
        """Make `serve_forever` return (from another thread), within half a second."""
        self._stop.set()

    def server_close(self) -> None:
        self.socket.close()
        for connection, pending in self._pending.items():
            self._close(connection, pending)
        self._pending.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)


def make_server(model_path: str, host: str, port: int, selftest_images: list[str] = ()) -> WebServer:
    """A server for `model_path`. `/selftest.json` holds the input tensors serve makes of `selftest_images`,
    flattened, for `/?selftest=1`: the browser's canvas resamples differently, so a comparison starts there."""
    check_litert()
    model, metadata = read_bundle(model_path)
    if metadata is None:
        raise BundleError(f"{model_path}: not an edge-pipeline bundle (no metadata); the page needs one")
    check_fixed_batch(model_path, model)
    public = metadata._replace(provenance=None).to_json()
    files = {
        "/model.tflite": (model, "application/octet-stream"),  # as it is: bundles take batch 1, as LiteRT.js needs
        "/bundle.json": (json.dumps(public).encode(), "application/json"),
        "/labels.json": (json.dumps(metadata.labels).encode(), "application/json"),
    }
    if selftest_images:
        from serve.preprocess import to_pixels

        size = metadata.input
        inputs = [to_pixels(i, size.height, size.width, size.channels).ravel().tolist() for i in selftest_images]
        files["/selftest.json"] = (json.dumps({"inputs": inputs}).encode(), "application/json")

    class Handler(HeadHandler):  # GET only; other methods get 501
        def do_GET(self) -> None:
            path = request_path(self.path)
            if path is None:
                self.send_error(HTTPStatus.BAD_REQUEST, "Bad path", "It holds NUL, control bytes or invalid UTF-8.")
            elif path in files:
                self._send(*files[path])
            elif path in STATIC:
                self._send_file(os.path.join(WEB_DIR, STATIC[path]))
            elif path.startswith("/node_modules/@litertjs/"):
                # realpath, then a prefix check: neither ".." nor a link reaches outside node_modules/@litertjs.
                wanted = os.path.realpath(os.path.join(LITERT_DIR, path.removeprefix("/node_modules/@litertjs/")))
                if wanted.startswith(os.path.realpath(LITERT_DIR) + os.sep) and os.path.isfile(wanted):
                    self._send_file(wanted)
                else:
                    self.send_error(HTTPStatus.NOT_FOUND)
            else:
                self.send_error(HTTPStatus.NOT_FOUND)

        def _send_file(self, path: str) -> None:
            with open(path, "rb") as f:
                body = f.read()
            self._send(body, CONTENT_TYPES.get(os.path.splitext(path)[1], "application/octet-stream"))

        def _send(self, body: bytes, content_type: str) -> None:
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")  # a restarted server may serve another bundle
            self.end_headers()
            self.wfile.write(body)

    try:
        return WebServer((host, port), Handler)
    except OSError as err:
        raise PipelineError(f"cannot listen on {host}:{port}: {err.strerror}") from None


def serve(model_path: str, host: str, port: int, selftest_images: list[str] = ()) -> None:
    """`pipeline serve-web`: serve `model_path` on `host`:`port` until Ctrl-C, saying where."""
    server = make_server(model_path, host, port, selftest_images)
    port = server.server_address[1]
    print(f"Serving {model_path} at http://{'localhost' if host in ('0.0.0.0', '::') else host}:{port}/", flush=True)
    if host in ("0.0.0.0", "::"):
        print(f"From a phone on the same network: http://<this machine's address>:{port}/", flush=True)
    print("Ctrl-C to stop.", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
