"""The phone-browser demo: LiteRT.js in headless Chromium gives serve's scores on the same input tensors.

Real processes throughout: npm installs LiteRT.js, `pipeline serve-web` serves a bundle, Chromium runs the page.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from serve import Classifier
from serve.bundle import read_bundle
from tests.conftest import PIPELINE, ROOT

WEB_DIR = ROOT / "serve" / "web"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="session")
def litert_js() -> None:
    """LiteRT.js from npm, as package-lock.json pins it."""
    if not (WEB_DIR / "node_modules" / "@litertjs" / "core").is_dir():
        if shutil.which("npm") is None:
            pytest.skip("npm is not installed: cannot fetch LiteRT.js")
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=WEB_DIR, check=True, capture_output=True)


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's Chromium, installed with apt when missing and running as root."""
    found = shutil.which("chromium")
    if found is None and shutil.which("apt-get") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
        if subprocess.run(install, env=env, capture_output=True).returncode != 0:  # stale package lists
            subprocess.run(["apt-get", "update"], env=env, check=True, capture_output=True)
            subprocess.run(install, env=env, check=True, capture_output=True)
        found = shutil.which("chromium")
    if found is None:
        pytest.skip("no chromium, and no apt-get as root to install it")
    return found


@contextlib.contextmanager
def serve_web(bundle, *options: str, log_path: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """`pipeline serve-web` for `bundle` on a free port, in a real process: (its URL, the process)."""
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [*PIPELINE, "serve-web", "-m", str(bundle), "--port", "0", *options],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        try:
            first_line = server.stdout.readline()
            url = re.search(r"http://\S+", first_line)
            assert url, f"serve-web printed no URL: {first_line!r}\n{log_path.read_text()}"
            yield url.group(0), server
        finally:
            server.terminate()
            server.wait(timeout=10)


def page_results(chromium: str, bundle, images, tmp_path) -> dict:
    """Run `/?selftest=1` for `bundle` on `images` in headless Chromium; the JSON the page wrote."""
    selftest = [f"--selftest={i}" for i in images]
    with serve_web(bundle, *selftest, log_path=tmp_path / "serve-web.log") as (url, _):
        # --dump-dom prints the page once it is idle: loaded, model run, #result written. LiteRT.js compiles its
        # WebAssembly asynchronously, which does not hold Chromium's virtual time: on a busy machine the page can
        # be printed while still "Loading the model…". Such a page is loaded again (a fresh browser), twice at most.
        for _attempt in range(3):
            with tempfile.TemporaryDirectory() as profile:
                page = subprocess.run(
                    [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=60000"]
                    + ["--dump-dom", url + "?selftest=1"],
                    capture_output=True,
                    text=True,
                    timeout=180,
                )
            if '<p id="status">Loading the model' not in page.stdout:
                break
    result = re.search(r'<pre id="result">(.*?)</pre>', page.stdout, re.S)
    assert result and result.group(1), f"the page wrote no result:\n{page.stdout[-2000:]}\n{page.stderr[-2000:]}"
    return json.loads(result.group(1))


def test_serve_web_leaks_no_provenance(bundles, runs_dir, litert_js, tmp_path):
    """Anyone on the network can fetch what serve-web serves: no training config, no paths of this machine."""
    with serve_web(bundles["int8"], log_path=tmp_path / "log") as (url, _):
        bundle = json.loads(urllib.request.urlopen(url + "bundle.json", timeout=10).read())
        model = urllib.request.urlopen(url + "model.tflite", timeout=10).read()
    assert "provenance" not in bundle and bundle["labels"] and bundle["input"]["height"] == 28
    _, metadata = read_bundle(bundles["int8"])
    assert bundle == {key: value for key, value in metadata.to_json().items() if key != "provenance"}
    assert str(runs_dir).encode() not in model


def test_serve_web_idle_connections_pin_no_threads(bundles, litert_js, tmp_path):
    """Idle connections do not each hold a thread, and clients that hang up print no traceback."""
    log_path = tmp_path / "log"
    with serve_web(bundles["int8"], log_path=log_path) as (url, server):
        host, port = re.match(r"http://([^:/]+):(\d+)/", url).groups()
        idle = [socket.create_connection((host, int(port)), timeout=5) for _ in range(100)]
        time.sleep(1)
        threads = len(os.listdir(f"/proc/{server.pid}/task"))
        for connection in idle:
            connection.close()
        for _ in range(20):  # hang up halfway through the model, as a phone going out of range would
            with socket.create_connection((host, int(port)), timeout=5) as hang_up:
                hang_up.sendall(b"GET /model.tflite HTTP/1.1\r\nHost: x\r\n\r\n")
                hang_up.recv(10)
        answer = urllib.request.urlopen(url + "labels.json", timeout=30).read()
    assert threads <= 16, f"{threads} threads for 100 idle connections"
    assert json.loads(answer) == Classifier(bundles["int8"]).labels
    assert "Traceback" not in log_path.read_text()


@pytest.mark.parametrize("mode", ["int8", "float16", "float32"])
def test_browser_scores_match_serve(mode, bundles, fmnist_images, litert_js, chromium, tmp_path):
    page = page_results(chromium, bundles[mode], fmnist_images, tmp_path)
    assert "error" not in page, page["error"]
    # What app.js read of the bundle is what serve's BundleMetadata holds for the bundle quantize wrote.
    _, metadata = read_bundle(bundles[mode])
    assert page["bundle"] == {
        "name": metadata.name,
        "quantization": metadata.quantization,
        "labels": metadata.labels,
        "height": metadata.input.height,
        "width": metadata.input.width,
        "channels": metadata.input.channels,
        "inputDtype": metadata.input_dtype,
        "inputScale": metadata.input_quantization.scale,
        "inputZeroPoint": metadata.input_quantization.zero_point,
        "outputScale": metadata.output_quantization.scale,
        "outputZeroPoint": metadata.output_quantization.zero_point,
    }
    classifier = Classifier(bundles[mode])
    # One image at a time, as the page runs them: a batch could take other kernel paths.
    expected = np.concatenate([classifier.predict(classifier.preprocess(i)[None]) for i in fmnist_images])
    got = np.array([r["scores"] for r in page["results"]], dtype=np.float32)
    assert got.shape == expected.shape == (len(fmnist_images), classifier.num_classes)
    if classifier.output_quantization[0]:  # uint8 scores: the same integers, dequantised alike
        np.testing.assert_array_equal(got, expected)
    else:  # float scores (float bundles, int8 with its softmax in float): other float kernels
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    assert (got.argmax(1) == expected.argmax(1)).all()


def test_serve_web_serves_the_bundle_as_it_is(bundles, litert_js, tmp_path):
    with serve_web(bundles["float16"], log_path=tmp_path / "log") as (url, _):
        assert urllib.request.urlopen(url + "model.tflite", timeout=10).read() == bundles["float16"].read_bytes()


def test_serve_web_refuses_a_bundle_with_an_open_batch(bundles, litert_js, tmp_path):
    """A bundle as exported before batch-1 signatures ([-1, 28, 28, 3]): LiteRT.js would refuse every image."""
    from pipeline.tensorflow_env import prepare

    prepare()
    import tensorflow as tf

    from quantize.metadata import embed_metadata
    from serve.bundle import read_bundle_metadata, read_model_file

    @tf.function(input_signature=[tf.TensorSpec([None, 28, 28, 3], tf.float32)])
    def scores(x):
        return tf.nn.softmax(tf.reshape(tf.reduce_mean(x, axis=[1, 2]), [-1, 3]) @ tf.ones([3, 10]))

    model = tf.lite.TFLiteConverter.from_concrete_functions([scores.get_concrete_function()], scores).convert()
    metadata = read_bundle_metadata(bundles["float32"], read_model_file(bundles["float32"]))
    old = tmp_path / "old_float32.tflite"
    old.write_bytes(embed_metadata(model, metadata))
    command = [*PIPELINE, "serve-web", "-m", str(old), "--port", "0"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"Error: {old}: its input shape is [-1, 28, 28, 3], with an open (-1) dimension that LiteRT.js refuses; "
        "export the bundle again (pipeline quantize) to fix the batch at 1"
    )


def address_of(url: str) -> tuple[str, int]:
    host, port = re.match(r"http://([^:/]+):(\d+)/", url).groups()
    return host, int(port)


def closed_by_the_server(connection: socket.socket) -> bool:
    """Whether the server has closed `connection` (it never answers a request it has not had in full)."""
    connection.setblocking(False)
    try:
        return connection.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:  # closed with our trickled header lines unread
        return True


def test_slow_clients_delay_no_normal_get_and_are_dropped_at_the_deadline(bundles, litert_js, tmp_path):
    """200 connections that never finish their request, 100 silent and 100 sending a header line every 2 s, from 20
    addresses (10 each, within the cap per address): a normal GET answers within 1 s all along, and the server closes
    every slow one at the whole-request deadline, however it trickles. About 15 s."""
    from serve.web.server import REQUEST_DEADLINE_SECONDS

    with serve_web(bundles["int8"], log_path=tmp_path / "log") as (url, _):
        address = address_of(url)
        slow = [socket.create_connection(address, 5, source_address=(f"127.0.0.{2 + i % 20}", 0)) for i in range(200)]
        trickling = slow[1::2]
        for connection in trickling:
            connection.sendall(b"GET / HTTP/1.1\r\n")
        opened = time.monotonic()
        next_line, slowest, answers = opened + 2, 0.0, 0
        while time.monotonic() < opened + REQUEST_DEADLINE_SECONDS + 2:
            if time.monotonic() >= next_line:
                next_line += 2
                for connection in trickling:
                    with contextlib.suppress(OSError):  # the server has closed it
                        connection.sendall(b"X-Slow: 1\r\n")
            started = time.monotonic()
            assert json.loads(urllib.request.urlopen(url + "labels.json", timeout=5).read())
            slowest = max(slowest, time.monotonic() - started)
            answers += 1
            time.sleep(0.2)
        still_open = [i for i, connection in enumerate(slow) if not closed_by_the_server(connection)]
        for connection in slow:
            connection.close()
    assert slowest < 1 and answers > 20, (slowest, answers)
    assert not still_open, f"{len(still_open)} slow connections still open after the deadline"


def test_one_address_holds_at_most_its_share_of_connections(bundles, litert_js, tmp_path):
    from serve.web.server import MAX_CONNECTIONS_PER_CLIENT

    with serve_web(bundles["int8"], log_path=tmp_path / "log") as (url, _):
        address, client = address_of(url), ("127.0.0.7", 0)
        held = [socket.create_connection(address, 5, source_address=client) for _ in range(MAX_CONNECTIONS_PER_CLIENT)]
        with socket.create_connection(address, 5, source_address=client) as one_more:
            one_more.settimeout(2)
            assert one_more.recv(1) == b""  # closed at once, not held
        assert not any(closed_by_the_server(connection) for connection in held)
        assert urllib.request.urlopen(url + "labels.json", timeout=5).read()  # other addresses are served
        for connection in held:
            connection.close()
        deadline = time.monotonic() + 5
        while True:  # the server counts the address's connections down as it sees them go
            connection = http.client.HTTPConnection(*address, timeout=5, source_address=client)
            try:
                connection.request("GET", "/labels.json")
                assert connection.getresponse().status == 200
                break
            except ConnectionError:
                assert time.monotonic() < deadline, "the address's closed connections were never counted down"
                time.sleep(0.1)
            finally:
                connection.close()


def test_a_port_in_use_is_one_line(bundles, litert_js):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        command = [*PIPELINE, "serve-web", "-m", str(bundles["int8"]), "--port", str(port)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"Error: cannot listen on 127.0.0.1:{port}: Address already in use"


BAD_PATHS = [b"/a%00b", b"/a\x00b", b"/%ff", b"/\xff.js", b"/%c3%28", b"/%0d%0aSet-Cookie:%20x", b"/%7f"]
BAD_PATHS += [b"/node_modules/@litertjs/core%00/dist/index.js", b"/node_modules/@litertjs/%e9"]


def test_bad_bytes_in_a_path_are_a_400_and_the_server_keeps_serving(bundles, litert_js, tmp_path):
    log_path = tmp_path / "log"
    with serve_web(bundles["int8"], log_path=log_path) as (url, _):
        for path in BAD_PATHS:
            with socket.create_connection(address_of(url), timeout=5) as connection:
                connection.sendall(b"GET " + path + b" HTTP/1.0\r\n\r\n")
                answer = connection.makefile("rb").read()
            assert answer.startswith(b"HTTP/1.0 400 "), (path, answer[:100])
        assert json.loads(urllib.request.urlopen(url + "labels.json", timeout=5).read())
        escaped = urllib.request.urlopen(url + "node_modules/@litertjs/core/dist/index%2Ejs", timeout=5).read()
    assert escaped == (WEB_DIR / "node_modules" / "@litertjs" / "core" / "dist" / "index.js").read_bytes()
    assert "Traceback" not in log_path.read_text() and "serve-web:" not in log_path.read_text()


def test_missing_litert_js_names_the_folder_the_server_reads(monkeypatch, tmp_path):
    from serve.errors import PipelineError
    from serve.web import server

    monkeypatch.setattr(server, "LITERT_DIR", str(tmp_path / "node_modules" / "@litertjs"))  # as before npm ran
    with pytest.raises(PipelineError) as raised:
        server.check_litert()
    # The absolute folder of the installed module (site-packages for a wheel), not serve/web under the current folder.
    assert str(raised.value) == f"LiteRT.js is not installed; run: npm ci --prefix {Path(server.__file__).parent}"
