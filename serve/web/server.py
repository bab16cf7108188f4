"""The phone-browser demo's server: the page, one bundle, its metadata and LiteRT.js. Standard library only.

`pipeline serve-web` runs it. The page does the inference in the browser; this only hands out files, to any
phone on the network: so it sends no provenance (training config, paths), answers with a bounded pool of
threads, and drops connections that stay idle.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer

from serve.bundle import read_bundle_metadata, read_model_file
from serve.errors import BundleError, PipelineError
from serve.tflite_flatbuffer import input_shape_signatures

WEB_DIR = os.path.dirname(os.path.abspath(__file__))
LITERT_DIR = os.path.join(WEB_DIR, "node_modules", "@litertjs")
STATIC = {"/": "index.html", "/index.html": "index.html", "/app.js": "app.js"}
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript", ".wasm": "application/wasm"}
WORKER_THREADS = 8  # connections served at once
WAITING_CONNECTIONS = 64  # accepted connections queued for a thread; beyond that new ones are closed at once
IDLE_TIMEOUT_SECONDS = 10  # a connection that sends nothing for this long is closed


def check_litert() -> None:
    """LiteRT.js comes from npm into serve/web/node_modules; say how to get it when it is missing."""
    if not os.path.isfile(os.path.join(LITERT_DIR, "core", "dist", "index.js")):
        raise PipelineError("LiteRT.js is not installed; run: npm install --prefix serve/web")


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


class PooledHTTPServer(HTTPServer):
    """An HTTPServer that hands connections to a fixed pool of threads. The standard ThreadingHTTPServer starts
    a thread per connection, so idle connections alone could pin any number of threads."""

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self._pool = ThreadPoolExecutor(WORKER_THREADS, thread_name_prefix="serve-web")
        self._slots = threading.BoundedSemaphore(WORKER_THREADS + WAITING_CONNECTIONS)

    def process_request(self, request: socket.socket, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # overloaded: the browser retries
            return
        self._pool.submit(self._serve, request, client_address)

    def _serve(self, request: socket.socket, client_address) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self._slots.release()

    def handle_error(self, request, client_address) -> None:
        """A client that goes away mid-answer is normal on a phone; anything else is one line, no traceback."""
        error = sys.exc_info()[1]
        if not isinstance(error, (ConnectionError, TimeoutError)):
            print(f"serve-web: {client_address[0]}: {type(error).__name__}: {error}", file=sys.stderr)

    def server_close(self) -> None:
        super().server_close()
        self._pool.shutdown(wait=False, cancel_futures=True)


def make_server(model_path: str, host: str, port: int, selftest_images: list[str] = ()) -> PooledHTTPServer:
    """A server for `model_path`. `/selftest.json` holds the input tensors serve makes of `selftest_images`,
    flattened, for `/?selftest=1`: the browser's canvas resamples differently, so a comparison starts there."""
    check_litert()
    model = read_model_file(model_path)
    metadata = read_bundle_metadata(model_path, model)
    if metadata is None:
        raise BundleError(f"{model_path}: not an edge-pipeline bundle (no metadata); the page needs one")
    check_fixed_batch(model_path, model)
    public = {key: value for key, value in metadata.items() if key != "provenance"}
    files = {
        "/model.tflite": (model, "application/octet-stream"),  # as it is: bundles take batch 1, as LiteRT.js needs
        "/bundle.json": (json.dumps(public).encode(), "application/json"),
        "/labels.json": (json.dumps(metadata.get("labels", [])).encode(), "application/json"),
    }
    if selftest_images:
        from serve.preprocess import to_pixels

        size = metadata["input"]
        inputs = [
            to_pixels(i, size["height"], size["width"], size["channels"]).ravel().tolist() for i in selftest_images
        ]
        files["/selftest.json"] = (json.dumps({"inputs": inputs}).encode(), "application/json")

    class Handler(BaseHTTPRequestHandler):  # GET only; other methods get 501
        timeout = IDLE_TIMEOUT_SECONDS  # on the socket: a silent or stalled client is dropped

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path in files:
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
        return PooledHTTPServer((host, port), Handler)
    except OSError as err:
        raise PipelineError(f"{host}:{port}: cannot listen ({err.strerror})") from None
