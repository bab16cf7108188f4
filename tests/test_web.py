"""The phone-browser demo: LiteRT.js in headless Chromium gives serve's scores on the same input tensors.

Real processes throughout: npm installs LiteRT.js, `pipeline serve-web` serves a bundle, Chromium runs the page.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile

import numpy as np
import pytest

from serve import Classifier
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


def page_results(chromium: str, bundle, images, tmp_path) -> dict:
    """Run `/?selftest=1` for `bundle` on `images` in headless Chromium; the JSON the page wrote."""
    log_path = tmp_path / "serve-web.log"
    log = open(log_path, "w")
    server = subprocess.Popen(
        [*PIPELINE, "serve-web", "-m", str(bundle), "--port", "0", *[f"--selftest={i}" for i in images]],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    try:
        first_line = server.stdout.readline()
        url = re.search(r"http://\S+", first_line)
        assert url, f"serve-web printed no URL: {first_line!r}\n{log_path.read_text()}"
        with tempfile.TemporaryDirectory() as profile:
            page = subprocess.run(
                # --dump-dom prints the page once it is idle: loaded, model run, #result written.
                [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=60000"]
                + ["--dump-dom", url.group(0) + "?selftest=1"],
                capture_output=True,
                text=True,
                timeout=180,
            )
    finally:
        server.terminate()
        server.wait(timeout=10)
        log.close()
    result = re.search(r'<pre id="result">(.*?)</pre>', page.stdout, re.S)
    assert result and result.group(1), f"the page wrote no result:\n{page.stdout[-2000:]}\n{page.stderr[-2000:]}"
    return json.loads(result.group(1))


@pytest.mark.parametrize("mode", ["int8", "float16", "float32"])
def test_browser_scores_match_serve(mode, bundles, fmnist_images, litert_js, chromium, tmp_path):
    page = page_results(chromium, bundles[mode], fmnist_images, tmp_path)
    assert "error" not in page, page["error"]
    classifier = Classifier(bundles[mode])
    # One image at a time, as the page runs them: a batch could take other kernel paths.
    expected = np.concatenate([classifier.predict(classifier.preprocess(i)[None]) for i in fmnist_images])
    got = np.array([r["scores"] for r in page["results"]], dtype=np.float32)
    assert got.shape == expected.shape == (len(fmnist_images), classifier.num_classes)
    if mode == "int8":
        np.testing.assert_array_equal(got, expected)
    else:
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    assert (got.argmax(1) == expected.argmax(1)).all()
