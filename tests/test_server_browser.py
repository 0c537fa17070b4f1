"""The web page at / driven in headless Chromium (Debian's `chromium` package, installed by
.ci/run): Generate on the tiny models, the progress bar moves, the image appears in the
gallery with its parameters and a download link, and nothing is fetched from anywhere but
the server. A screenshot is saved to test-artifacts/serve-page.png.

Chromium is driven over its DevTools protocol (a websocket on 127.0.0.1); host names other
than the server's do not resolve, so the browser can reach nothing else.
"""

import base64
import json
import shutil
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from serve_harness import RunningServer, make_config

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
         "--disable-extensions", "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--no-pings", "--disable-domain-reliability", "--window-size=1100,900",
         "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1", "--remote-debugging-port=0"]

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium package is not installed "
                                                         "(apt-get install chromium; .ci/run installs it)")


class Browser:
    """Just enough of the Chrome DevTools protocol: evaluate JavaScript, navigate, screenshot."""

    def __init__(self, profile: Path):
        from websockets.sync.client import connect

        self.proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("chromium did not start")
            time.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        pages = [t for t in httpx.get(f"http://127.0.0.1:{port}/json/list", trust_env=False).json()
                 if t["type"] == "page"]
        self.stack = ExitStack()
        self.ws = self.stack.enter_context(connect(pages[0]["webSocketDebuggerUrl"], max_size=None,
                                                   open_timeout=30, proxy=None))
        self.next_id = 0

    def call(self, method: str, timeout: float = 60, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            reply = json.loads(self.ws.recv(timeout=max(deadline - time.monotonic(), 0.01)))
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                value = self.js(expression)
            except RuntimeError:  # the page is not there yet
                value = None
            if value:
                return value
            time.sleep(0.03)
        raise AssertionError(f"timed out waiting for {expression}")

    def close(self):
        self.stack.close()
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(15)


@pytest.fixture()
def page(tiny_sdxl, tmp_path):
    server = RunningServer(make_config(tiny_sdxl[0], tiny_sdxl[1]))
    browser = Browser(tmp_path / "profile")
    try:
        browser.call("Page.navigate", url=server.url + "/")
        browser.wait_for("document.getElementById('sampler').options.length > 1")
        yield browser, server
    finally:
        browser.close()
        server.stop()


def test_page_generates_with_progress_and_gallery(page):
    browser, server = page
    for field, value in (("prompt", "a photo of a cat"), ("width", 64), ("height", 64), ("steps", 30), ("seed", 5)):
        browser.js(f"document.getElementById({field!r}).value = {json.dumps(str(value))}")
    browser.js("document.getElementById('generate').click()")
    bar_values, deadline = set(), time.monotonic() + 120
    while not browser.js("document.querySelector('#gallery figure img') !== null"):
        bar_values.add(browser.js("document.getElementById('bar').value"))
        assert time.monotonic() < deadline, "no image appeared"
        time.sleep(0.02)
    assert any(0 < v < 100 for v in bar_values), bar_values          # the bar moved while it ran
    browser.wait_for("document.querySelector('#gallery img').complete")
    assert browser.js("document.querySelector('#gallery img').naturalWidth") == 64
    assert "Seed: 5," in browser.js("document.querySelector('#gallery figcaption pre').textContent")
    link = browser.js("(() => { const a = document.querySelector('#gallery a'); "
                      "return [a.download, a.href.slice(0, 22)]; })()")
    assert link == ["mlx-sdxl-5.png", "data:image/png;base64,"]
    assert browser.js("document.getElementById('bar').value") == 100
    assert browser.js("document.getElementById('error').textContent") == ""
    fetched = browser.js("performance.getEntriesByType('resource').map(e => e.name)")
    assert fetched and all(url.startswith(server.url) for url in fetched), fetched
    shot = base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"])
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "serve-page.png").write_bytes(shot)
    assert shot[:8] == b"\x89PNG\r\n\x1a\n"
