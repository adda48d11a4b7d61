"""The web page in a real browser: headless Chromium (Debian's chromium and chromedriver) driven by selenium.

Run by ``make test-browser`` (``pytest -m browser``); the plain suite deselects it. The screenshot goes to
``$DCRIS_TEST_ARTIFACTS/app.png`` (make test-browser: ``runs/test-browser/app.png``), else to pytest's tmp_path.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from ports import free_port

from dcris.draw import overlay
from dcris.segmenter import Segmenter

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
WAIT_S = 180  # a loaded 2-core machine serves slowly
LONG = "the small red circle on the left next to the big blue square below the green triangle"


@pytest.fixture(scope="module")
def served(tiny_segmenter, tmp_path_factory):
    """``dcris app`` serving the tiny model from an export folder: (url, export folder)."""
    export = tiny_segmenter.save_pretrained(tmp_path_factory.mktemp("app") / "export")
    port = free_port()
    log = tmp_path_factory.mktemp("app_log") / "server.log"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    argv = [sys.executable, "-m", "dcris", "app", "--weights", str(export), "--port", str(port), "--device", "cpu"]
    with open(log, "w") as out:
        server = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + WAIT_S
        while True:
            assert server.poll() is None, f"dcris app exited:\n{log.read_text()}"
            try:
                urllib.request.urlopen(url, timeout=5)
                break
            except OSError:
                assert time.time() < deadline, f"dcris app did not answer in {WAIT_S} s:\n{log.read_text()}"
                time.sleep(1)
        yield url, export
    finally:
        server.terminate()
        server.wait(30)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium without network side traffic and with a fresh profile."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (binary and driver):
        pytest.fail("needs Debian's chromium and chromium-driver: make test-browser installs them")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,1000",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium_profile')}"):  # fmt: skip
        options.add_argument(flag)
    chrome = webdriver.Chrome(service=Service(driver), options=options)
    try:
        yield chrome
    finally:
        chrome.quit()


# Notes any change under #status (its text, or the progress tracker Gradio shows there while an event runs): a
# result that repeats the previous status word for word still counts as an answer.
WATCH_STATUS = """
window.dcrisStatusChanged = false;
new MutationObserver(() => { window.dcrisStatusChanged = true; }).observe(
    document.querySelector('#status'), {subtree: true, childList: true, characterData: true, attributes: true});
"""


class Page:
    """The page's controls, found by their element ids."""

    def __init__(self, chrome, url: str) -> None:
        from selenium.webdriver.common.by import By

        self.chrome, self.by = chrome, By
        chrome.get(url)
        self.wait_for(lambda: chrome.find_elements(By.CSS_SELECTOR, "#run"), "Run button")

    def wait_for(self, condition, what: str):
        from selenium.webdriver.support.ui import WebDriverWait

        return WebDriverWait(self.chrome, WAIT_S, poll_frequency=0.2).until(lambda _: condition(), f"no {what}")

    def find(self, css: str):
        return self.chrome.find_element(self.by.CSS_SELECTOR, css)

    @property
    def status(self) -> str:
        return self.find("#status").text

    def answered(self, action, what: str) -> str:
        """Does ``action`` and waits until the page has answered it in #status and is idle; returns the status."""
        self.chrome.execute_script(WATCH_STATUS)
        action()

        def idle() -> bool:
            tracker = self.find("#status [data-testid='status-tracker']").get_attribute("class")
            return self.chrome.execute_script("return window.dcrisStatusChanged") and "hide" in tracker.split()

        self.wait_for(idle, what)
        return self.status

    def upload(self, path: Path) -> str:
        for clear in self.chrome.find_elements(self.by.CSS_SELECTOR, "#image button[aria-label='Clear']"):
            clear.click()
        self.wait_for(lambda: self.chrome.find_elements(self.by.CSS_SELECTOR, "#image input[type=file]"), "upload")
        return self.answered(lambda: self.find("#image input[type=file]").send_keys(str(path)), "upload status")

    def run(self, phrases: str) -> str:
        """Types the phrases (one per line), presses Run and waits for the answer; returns the status."""
        from selenium.webdriver.common.keys import Keys

        box = self.find("#phrases textarea")
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.DELETE)
        for k, line in enumerate(phrases.split("\n")):
            box.send_keys(*([Keys.ENTER] if k else []), line)  # Enter: a new line (Shift+Enter runs)
        assert box.get_attribute("value") == phrases
        return self.answered(self.find("#run").click, "result")

    def overlay(self) -> np.ndarray:
        """The result picture as served to the page (PNG, fetched from its URL)."""
        src = self.find("#overlay img").get_attribute("src")
        with urllib.request.urlopen(src, timeout=30) as response:
            return np.asarray(Image.open(io.BytesIO(response.read())).convert("RGB"))


def test_page_shows_the_python_api_masks(served, browser, probe, tmp_path):
    url, export = served
    image, phrases = probe
    path = tmp_path / "probe.png"
    Image.fromarray(image).save(path)
    api = Segmenter.from_pretrained(export, device="cpu")
    page = Page(browser, url)
    assert page.upload(path) == "image loaded: type phrases and press Run"

    status = page.run(phrases[0])
    assert status.startswith("1 phrase(s) in"), status
    shown = page.overlay()
    assert shown.shape == image.shape  # the image's own size
    # every tinted pixel differs from the image (its values stay below 201, the tint's red is 255)
    np.testing.assert_array_equal((shown != image).any(axis=-1), api(image, phrases[0]).mask)

    status = page.run("\n".join(phrases))
    assert status.startswith("2 phrase(s) in"), status
    masks = [r.mask for r in api(image, phrases)]
    expected = np.asarray(overlay(Image.fromarray(image), masks))
    np.testing.assert_array_equal(page.overlay(), expected)  # each phrase in its own colour
    rows = page.find("#results").find_elements(page.by.CSS_SELECTOR, "tr")
    assert len(rows) == 3 and all(phrase in row.text for phrase, row in zip(phrases, rows[1:], strict=True))
    artifacts = Path(os.environ.get("DCRIS_TEST_ARTIFACTS") or tmp_path)
    artifacts.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(artifacts / "app.png"))
    print(f"screenshot: {artifacts / 'app.png'}")


def test_bad_input_is_a_message_and_the_page_keeps_serving(served, browser, probe, tmp_path):
    url, _ = served
    image, phrases = probe
    good, junk = tmp_path / "probe.png", tmp_path / "junk.png"
    Image.fromarray(image).save(good)
    junk.write_bytes(b"not an image")
    page = Page(browser, url)
    page.upload(good)
    assert page.run("").startswith("error: type a phrase")
    status = page.run(f"{LONG}\n{phrases[0]}")
    assert "1 phrase(s) were too long and were cut" in status
    assert "cut to the first 17 tokens" in page.find("#results").text
    assert page.upload(junk).startswith("error: cannot read 'junk.png'")
    assert page.run(phrases[0]).startswith("error: cannot read 'junk.png'")
    page.upload(good)  # the server is still there
    assert page.run(phrases[0]).startswith("1 phrase(s) in")
