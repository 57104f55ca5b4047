"""End to end: `busi-batch demo` in a subprocess on a free localhost port, driven by a real headless Chromium.

Debian's /usr/bin/chromium through Playwright (no browser download). The page's class and area for an uploaded
image must equal `busi-batch run`'s CSV row for it; bad uploads must give a message, not a traceback; and no
request may leave 127.0.0.1. Set BUSI_BATCH_SCREENSHOT=docs/demo.png to keep the screenshot (the README's
picture), and BUSI_BATCH_DEMO_WEIGHTS=PATH to run it with another checkpoint (for example the shipped model).

Skips, saying why, when gradio, playwright or /usr/bin/chromium is missing; `.ci/run` installs all three and sets
BUSI_BATCH_REQUIRE_BROWSER_TEST=1, which turns such a skip into an error.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from busi_batch import demo
from busi_batch.model import load_model
from test_demo import SAMPLE, contrast_checkpoint, one_image_run

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic", "--disable-dev-shm-usage"]
START_TIMEOUT_S = 120  # a cold start (importing torch and gradio) on a busy 2-core machine
RESULT_TIMEOUT_MS = 30_000


def _missing(reason: str) -> None:
    """Skip, saying why; but in CI (BUSI_BATCH_REQUIRE_BROWSER_TEST=1, set by .ci/run) a skip would hide that the
    demo went untested, so it is an error there."""
    if os.environ.get("BUSI_BATCH_REQUIRE_BROWSER_TEST") == "1":
        raise RuntimeError(f"browser test required but cannot run: {reason}")
    pytest.skip(reason, allow_module_level=True)


try:
    import gradio  # noqa: F401
except ImportError:
    _missing("the demo extra is not installed: pip install -e '.[demo]'")
try:
    from playwright import sync_api
except ImportError:
    _missing("playwright is not installed: pip install -e '.[browser-test]'")
if not CHROMIUM.exists():
    _missing(f"{CHROMIUM} is missing: apt-get install --no-install-recommends chromium")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    chosen = os.environ.get("BUSI_BATCH_DEMO_WEIGHTS")
    if chosen:
        return Path(chosen).resolve()
    return contrast_checkpoint(tmp_path_factory.mktemp("demo-weights") / "contrast.pt")


@pytest.fixture(scope="module")
def server(weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The console command itself, as a user starts it; its log is shown if it fails to come up."""
    workdir = tmp_path_factory.mktemp("demo-server")
    port = free_port()
    log_path = workdir / "server.log"
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONUNBUFFERED": "1",
           "GRADIO_TEMP_DIR": str(workdir / "gradio")}  # uploads land in the test's own folder
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "busi_batch", "demo", "--port", str(port), "--weights", str(weights),
             "--device", "cpu"],
            cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"busi-batch demo exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"busi-batch demo did not answer within {START_TIMEOUT_S} s:\n{log_path.read_text()}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert "Traceback" not in log_path.read_text(), log_path.read_text()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server: str) -> Iterator[object]:
    """A fresh page on the demo. Any request for another address is blocked (so the test itself sends nothing
    out) and recorded, and fails the test: the page must need nothing but the demo's own server."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    local: list[str] = []
    outside: list[str] = []

    def guard(route) -> None:
        url = route.request.url
        if url.startswith(server):
            local.append(url)
            route.continue_()
        else:
            outside.append(url)
            route.abort()

    context.route("**/*", guard)
    tab = context.new_page()
    tab.goto(server)
    tab.wait_for_selector("#busi-result")
    yield tab
    context.close()
    assert not outside, f"the page tried to reach other addresses: {outside}"
    assert local, "no request was seen: the guard is not working"


#: The result shows ``text``, no component is still "processing", and every picture has loaded.
SETTLED_WITH = """text => document.querySelector('#busi-result').innerText.includes(text)
    && document.querySelectorAll('[data-testid=status-tracker]:not(.hide)').length === 0
    && [...document.images].every(img => img.complete && img.naturalWidth > 0)"""


def result_text(page, contains: str) -> str:
    page.wait_for_function(SETTLED_WITH, arg=contains, timeout=RESULT_TIMEOUT_MS)
    return page.locator("#busi-result").inner_text()


def shown(text: str, label: str) -> str:
    match = re.search(rf"^{label}\s+(.+)$", text, re.MULTILINE)
    assert match, f"{label!r} not shown in:\n{text}"
    return match.group(1).strip()


def test_page_states_intended_use_and_model(page, weights: Path) -> None:
    card = served_model(weights).card
    text = page.locator("#busi-model").inner_text()
    assert demo.DISCLAIMER in text
    assert f"{card.name}, version {card.version}" in text
    assert "Held-out test scores (model card):" in text
    assert page.title() == "busi-batch demo"


def test_upload_shows_what_run_writes(page, weights: Path, tmp_path: Path) -> None:
    row, _ = one_image_run(SAMPLE, weights, tmp_path)
    page.set_input_files("#busi-upload input[type=file]", str(SAMPLE))
    text = result_text(page, f"Result for {SAMPLE.name}")
    assert shown(text, "Predicted class") == row.pred_class
    assert shown(text, "Lesion area") == f"{row.lesion_area_px:,} px²"
    assert shown(text, "Lesion count") == str(row.lesion_count)
    assert shown(text, "Confidence") == f"{row.confidence:.3f}"
    assert shown(text, "Image size") == f"{row.width} × {row.height} px"
    probabilities = page.locator("#busi-probabilities").inner_text()
    assert row.pred_class in probabilities
    for name in ("normal", "benign", "malignant"):
        assert f"{round(100 * getattr(row, f'p_{name}'))}%" in probabilities
    # The pictures arrived at the image's own size.
    for elem in ("#busi-overlay img", "#busi-mask img"):
        assert page.locator(elem).evaluate("img => [img.naturalWidth, img.naturalHeight]") == [row.width, row.height]


def test_pixel_size_adds_mm2(page, weights: Path, tmp_path: Path) -> None:
    row, _ = one_image_run(SAMPLE, weights, tmp_path, pixel_size=0.1)
    page.locator("#busi-pixel-size input").fill("0.1")
    page.set_input_files("#busi-upload input[type=file]", str(SAMPLE))
    text = result_text(page, "mm²")
    assert shown(text, "Lesion area") == f"{row.lesion_area_px:,} px² ({row.lesion_area_mm2:,.1f} mm²)"


def test_bad_upload_gets_a_message_not_a_traceback(page) -> None:
    page.set_input_files(
        "#busi-upload input[type=file]", files=[{"name": "broken.png", "mimeType": "image/png", "buffer": b"junk"}]
    )
    text = result_text(page, "Cannot analyse")
    assert "broken.png" in text and "not a readable image" in text
    assert "Traceback" not in page.locator("body").inner_text()


def test_oversized_upload_is_refused_in_the_page(page, tmp_path: Path) -> None:
    big = tmp_path / "huge.png"
    with open(big, "wb") as fh:
        fh.truncate(51 * 1024 * 1024)  # sparse: just over the 50 MB limit
    page.set_input_files("#busi-upload input[type=file]", str(big))
    page.get_by_text("exceed the maximum allowed size").wait_for(timeout=RESULT_TIMEOUT_MS)
    assert "Traceback" not in page.locator("body").inner_text()


def served_model(weights: Path):
    """The model as the served demo loads it: the default precision (bf16 on CPUs that have it)."""
    import torch

    from busi_batch.runtime import select_precision

    return load_model(weights, "cpu", select_precision("auto", torch.device("cpu")))


def test_example_shows_ground_truth_dice_and_iou(page, weights: Path, tmp_path: Path) -> None:
    examples = demo.example_items()
    label = next(name for name, item in examples.items() if item.true_class == "malignant")
    expected = demo.analyse(served_model(weights), examples[label]).row
    page.locator("#busi-example input").click()
    page.get_by_role("option", name=label).click()
    text = result_text(page, "Dice")
    assert shown(text, "True class") == "malignant"
    assert shown(text, "Predicted class") == expected.pred_class
    assert shown(text, "Lesion area") == f"{expected.lesion_area_px:,} px²"
    assert shown(text, "Dice") == f"{expected.dice:.3f}"
    assert shown(text, "IoU") == f"{expected.iou:.3f}"
    assert page.locator("#busi-truth img").evaluate("img => img.naturalWidth") == expected.width
    shot = tmp_path / "demo.png"
    page.screenshot(path=str(shot), full_page=True, animations="disabled")  # not mid fade-in
    assert shot.stat().st_size > 10_000
    target = os.environ.get("BUSI_BATCH_SCREENSHOT")
    if target:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, target)
