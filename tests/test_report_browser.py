"""The report in a real browser: headless Chromium opens report.html from disk, and the page must render.

Chromium is driven over the DevTools protocol on a pipe (--remote-debugging-pipe: JSON messages ending in a NUL
byte, commands on the child's fd 3, replies and events on its fd 4), so no websocket library is needed. The test
checks: no console message of level error or warning, no uncaught exception, no request other than the file itself
and data: URIs (no network at view time), every image decoded, every section shown, and a full-page screenshot of
the expected size that is not blank. Set REPORT_SCREENSHOT=path to keep the screenshot (docs/report.png is one).
Debian: `apt-get install -y chromium`; the test skips when no chromium is on the PATH.
"""

from __future__ import annotations

import base64
import fcntl
import io
import json
import os
import select
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scvi_scale.report import build_report, log_normalize, missing_extra
from scvi_scale.report.html import SECTIONS

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
WIDTH = 1280
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium on the PATH (Debian: apt-get install -y chromium)"),
    pytest.mark.skipif(missing_extra() is not None, reason=str(missing_extra())),
]
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--remote-debugging-pipe",
]


def _above_nine(fd: int) -> int:
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return moved


class DevTools:
    """A DevTools protocol session with a Chromium child over its debugging pipe; events are kept in `events`."""

    def __init__(self, user_data_dir: Path, timeout: float = 60.0):
        commands_read, self._commands = os.pipe()
        self._replies, replies_write = os.pipe()
        # the child's ends moved above fd 9 first, so that placing them on 3 and 4 cannot overwrite either; bash
        # places them (no preexec_fn: forking a process that runs jax threads from Python is unsafe)
        commands_read, replies_write = (_above_nine(fd) for fd in (commands_read, replies_write))
        place = f'exec "$0" "$@" 3<&{commands_read} 4>&{replies_write}'
        self.process = subprocess.Popen(
            ["bash", "-c", place, CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={user_data_dir}", "about:blank"],
            pass_fds=(commands_read, replies_write),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(commands_read)
        os.close(replies_write)
        self.timeout = timeout
        self.events: list[dict] = []
        self._buffer = b""
        self._next_id = 0

    def _message(self) -> dict:
        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._replies], [], [], self.timeout)
            chunk = os.read(self._replies, 1 << 20) if ready else b""
            if not chunk:
                raise TimeoutError(f"chromium said nothing for {self.timeout} s (or exited)")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, session: str | None = None, **params) -> dict:
        self._next_id += 1
        command = {"id": self._next_id, "method": method, "params": params}
        if session is not None:
            command["sessionId"] = session
        os.write(self._commands, json.dumps(command).encode() + b"\0")
        while True:
            message = self._message()
            if message.get("id") == self._next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]
            self.events.append(message)

    def wait_for(self, method: str) -> dict:
        for event in self.events:
            if event.get("method") == method:
                return event
        while True:
            message = self._message()
            self.events.append(message)
            if message.get("method") == method:
                return message

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._commands)
        os.close(self._replies)


def small_report(out_dir: Path) -> dict:
    """A report of a planted latent (5 types, 3 batches), without training: this test is about the page."""
    rng = np.random.default_rng(0)
    n_cells = 600
    types, batches = rng.integers(0, 5, n_cells), rng.integers(0, 3, n_cells)
    latent = rng.normal(size=(n_cells, 8)) + 3 * np.eye(8)[types]
    counts = sp.random(
        n_cells, 200, density=0.1, random_state=1, format="csr", data_rvs=lambda n: rng.poisson(3, n) + 1
    )
    obs = pd.DataFrame(
        {
            "batch": pd.Categorical([f"donor{b}" for b in batches]),
            "cell_type": pd.Categorical([f"type {chr(65 + t)}" for t in types]),
            "library_size": np.asarray(counts.sum(axis=1)).ravel(),
        }
    )
    epochs = range(40)
    history = {
        "elbo_train": [(e, 2000 / (e + 1) + 500) for e in epochs],
        "elbo_validation": [(e, 2100 / (e + 1) + 520) for e in epochs],
        "reconstruction_loss_train": [(e, 1900 / (e + 1) + 480) for e in epochs],
        "reconstruction_loss_validation": [(e, 2000 / (e + 1) + 500) for e in epochs],
        "kl_local_train": [(e, 15 + 0.2 * e) for e in epochs],
        "kl_local_validation": [(e, 16 + 0.2 * e) for e in epochs],
        "kl_weight": [(e, min(1.0, e / 20)) for e in epochs],
        "lr": [(e, 1e-3) for e in epochs],
        "epoch_seconds": [(e, 2.0) for e in epochs],
    }
    run = {
        "cells_per_second": 41_250.5,
        "peak_rss_bytes": 3_221_225_472,
        "device": "cpu",
        "threads": 2,
        "seconds": 80.0,
    }
    outputs = [
        {"entry": "obsm/X_scvi", "kind": "obsm", "shape": [n_cells, 8], "bytes": n_cells * 32, "complete": True},
        {
            "entry": "layers/scvi_normalized",
            "kind": "layer",
            "shape": [n_cells, 200],
            "bytes": n_cells * 800,
            "complete": False,
        },
    ]
    return build_report(
        out_dir,
        latent=latent,
        obs=obs,
        batch_key="batch",
        labels_key="cell_type",
        history=history,
        run=run,
        outputs=outputs,
        counts_for_baseline=log_normalize(counts),
    )


def test_report_renders_in_headless_chromium(tmp_path):
    from matplotlib.image import imread

    report = small_report(tmp_path / "report")
    page = tmp_path / "report" / "report.html"
    browser = DevTools(tmp_path / "profile")
    try:
        target = browser.call("Target.createTarget", url="about:blank")["targetId"]
        session = browser.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            browser.call(f"{domain}.enable", session)
        browser.call(
            "Emulation.setDeviceMetricsOverride", session, width=WIDTH, height=900, deviceScaleFactor=1, mobile=False
        )
        browser.call("Page.navigate", session, url=page.as_uri())
        browser.wait_for("Page.loadEventFired")

        def evaluate(expression: str):
            reply = browser.call("Runtime.evaluate", session, expression=expression, returnByValue=True)
            return reply["result"]["value"]

        images = evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
        titles = evaluate("Array.from(document.querySelectorAll('section > h2')).map(h => h.textContent)")
        height = evaluate("document.documentElement.scrollHeight")
        shot = browser.call(
            "Page.captureScreenshot",
            session,
            format="png",
            captureBeyondViewport=True,
            clip={"x": 0, "y": 0, "width": WIDTH, "height": height, "scale": 1},
        )
        events = list(browser.events)
    finally:
        browser.close()

    problems = [e["params"] for e in events if e.get("method") == "Runtime.exceptionThrown"]
    problems += [
        e["params"]
        for e in events
        if e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "warning")
    ]
    problems += [
        e["params"]["entry"]
        for e in events
        if e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] in ("error", "warning")
    ]
    assert problems == []
    requested = [e["params"]["request"]["url"] for e in events if e.get("method") == "Network.requestWillBeSent"]
    assert requested and all(url == page.as_uri() or url.startswith("data:") for url in requested), requested

    assert titles == list(SECTIONS.values())
    assert len(images) == len(report["images"]) == 3
    for (complete, width, height_px), name in zip(images, ["history", "umap", "scib"]):
        expected = imread(tmp_path / "report" / f"{name}.png").shape
        assert complete and (height_px, width) == expected[:2], name

    png = base64.b64decode(shot["data"])
    if os.environ.get("REPORT_SCREENSHOT"):
        Path(os.environ["REPORT_SCREENSHOT"]).write_bytes(png)
    pixels = imread(io.BytesIO(png))[..., :3]
    assert pixels.shape[:2] == (height, WIDTH) and height > 2000  # five sections and three figures, one column
    background = np.all(pixels > 0.97, axis=-1).mean()  # white or near-white
    assert background < 0.9  # something drawn
    assert len(np.unique((pixels[::4, ::4] * 255).astype(np.uint8).reshape(-1, 3), axis=0)) > 200  # figures' colours
