"""The scan viewer (``detect --html``): its encoding, and the page in a real headless Chromium.

The browser tests need Debian's ``chromium`` at /usr/bin/chromium and the ``playwright`` package
(``make test`` installs both). Where either is missing or Chromium cannot start, they fail and say
so: they never pass without a browser having run the page.

``NODULEKIT_VIEWER_SCREENSHOT=docs/img/viewer.png`` makes the page test also save its screenshot
there (the README's picture).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest

from nodulekit.data.volume import CTVolume
from nodulekit.detect.viewer import CODE_KNOTS, HU_KNOTS, viewer_document, write_viewer

CHROMIUM = "/usr/bin/chromium"
# as root in a closed network: no sandbox, no GPU, and no background connections to fail
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _data(html: str) -> dict:
    m = re.search(r'<script type="application/json" id="data">(.*?)</script>', html, re.S)
    return json.loads(m.group(1))


@pytest.fixture(scope="module")
def scan():
    """A synthetic chest (256x256x48) with its nodules as findings, plus one low-probability one."""
    from nodulekit.data.synth.scan import generate_scan
    from nodulekit.detect.candidates import find_candidates

    s = generate_scan(0, 2, size=256, max_slices=48)
    labels = s.labels.astype(np.int32)
    found = find_candidates(s.ct.hu, labels, int(labels.max()), s.ct)
    assert len(found) >= 2, "the scan should hold two nodules or more"
    for k, f in enumerate(found):
        f.probability = [0.93, 0.71, 0.22, 0.6][k % 4]
    return s.ct, labels, sorted(found, key=lambda f: -f.probability)


def test_slices_decode_back_to_hu(scan):
    """What the page shows is the scan: a slice decoded as the page decodes it lies within JPEG's
    error of the HU, and the outlines sit on the findings' own slices."""
    from PIL import Image

    ct, labels, found = scan
    data = _data(viewer_document(ct, labels, found, threshold=0.5))
    assert data["shape"] == list(ct.shape) and len(data["slices"]) == ct.shape[0]
    k = ct.shape[0] // 2
    codes = np.asarray(Image.open(io.BytesIO(base64.b64decode(data["slices"][k]))), dtype=np.float32)
    hu = np.interp(codes, CODE_KNOTS, HU_KNOTS)
    inside = (ct.hu[k] > -1000) & (ct.hu[k] < 300)
    assert np.median(np.abs(hu - ct.hu[k])[inside]) < 25
    for f, d in zip(found, data["findings"]):
        assert d["slice"] == round(f.center_irc[0]) and str(d["slice"]) in d["outline"]
        assert d["reported"] == (f.probability >= 0.5)
        pts = np.array(d["outline"][str(d["slice"])])
        assert np.all(labels[d["slice"]].ravel()[pts] == f.label)


def _launch(playwright, user_data_dir: Path):
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (`make test` does: apt-get install chromium)")
    try:
        return playwright.chromium.launch_persistent_context(
            str(user_data_dir), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 760})
    except Exception as exc:  # noqa: BLE001 - any failure to start is this test's failure, said plainly
        pytest.fail(f"Chromium ({CHROMIUM}) did not start under Playwright: {' '.join(str(exc).split())[:600]}")


@pytest.fixture
def browser(tmp_path):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        pytest.fail(f"the playwright package is missing ({exc}); `make test` installs requirements-dev.txt")
    with sync_playwright() as p:
        context = _launch(p, tmp_path / "chromium-profile")
        try:
            yield context
        finally:
            context.close()


def _open(context, url: str, errors: list):
    page = context.new_page()
    page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
    page.goto(url)
    page.wait_for_selector("#canvas[data-drawn]")  # a selector: the page's CSP forbids the eval a polled function needs
    return page


def _slice(page) -> int:
    return int(page.get_attribute("#counter", "data-slice"))


def _wait_slice(page, k: int) -> None:
    page.wait_for_selector(f'#canvas[data-drawn="{k}"]', timeout=5000)


def test_viewer_in_chromium(tmp_path, scan, browser):
    ct, labels, found = scan
    html = write_viewer(ct, labels, found, tmp_path / "viewer" / f"{ct.seriesuid}.html", threshold=0.5)
    errors: list[str] = []
    page = _open(browser, html.as_uri(), errors)
    reported = [f for f in found if f.probability >= 0.5]
    assert _slice(page) == round(reported[0].center_irc[0])  # opens on the most probable nodule

    # the wheel over the image scrolls
    box = page.locator("#canvas").bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    start = _slice(page)
    page.mouse.wheel(0, 120)
    _wait_slice(page, start + 1)
    page.mouse.wheel(0, -120)
    page.mouse.wheel(0, -120)
    _wait_slice(page, start - 1)
    assert f"slice {start} / {ct.shape[0]}" in page.text_content("#counter")

    # a row of the table shows its nodule's slice; only reported nodules are listed
    rows = page.locator("#table tbody tr")
    assert rows.count() == len(reported)
    target = round(reported[1].center_irc[0])
    rows.nth(1).click()
    _wait_slice(page, target)
    assert _slice(page) == target and f"slice {target + 1} / " in page.text_content("#counter")

    # the window preset changes the picture; the box shows the low-probability candidate too
    lung = page.evaluate("document.getElementById('canvas').toDataURL()")
    page.click("#w-mediastinum")
    assert page.evaluate("document.getElementById('canvas').toDataURL()") != lung
    assert "on" in page.get_attribute("#w-mediastinum", "class")
    page.check("#all")
    assert rows.count() == len(found)
    page.uncheck("#all")
    page.click("#w-lung")
    rows.nth(0).click()
    _wait_slice(page, round(reported[0].center_irc[0]))

    shot = page.screenshot(path=str(tmp_path / "viewer.png"))
    assert len(shot) > 10_000
    if os.environ.get("NODULEKIT_VIEWER_SCREENSHOT"):
        Path(os.environ["NODULEKIT_VIEWER_SCREENSHOT"]).write_bytes(shot)

    # nodules.json's links: #slice=K opens slice K
    page2 = _open(browser, html.as_uri() + "#slice=5", errors)
    assert _slice(page2) == 5
    assert errors == []


def test_a_300_slice_scan_stays_responsive(tmp_path, browser):
    """300 slices of 256x256: the page loads, and 40 wheel steps each draw their slice promptly."""
    rng = np.random.default_rng(0)
    hu = np.full((300, 256, 256), -1000, dtype=np.int16)
    yy, xx = np.ogrid[:256, :256]
    hu[:, (yy - 128) ** 2 + (xx - 128) ** 2 < 110 ** 2] = 40
    hu[:, ((yy - 128) ** 2 + (xx - 80) ** 2 < 40 ** 2) | ((yy - 128) ** 2 + (xx - 176) ** 2 < 40 ** 2)] = -850
    hu += rng.normal(0, 20, hu.shape).astype(np.int16)
    ct = CTVolume(hu, (0.0, 0.0, 0.0), (1.2, 1.2, 1.0), np.eye(3), "big", "test")
    html = write_viewer(ct, None, [], tmp_path / "big.html")
    errors: list[str] = []
    t = time.perf_counter()
    page = _open(browser, html.as_uri(), errors)
    load_s = time.perf_counter() - t
    box = page.locator("#canvas").bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    start = _slice(page)
    t = time.perf_counter()
    for k in range(1, 41):
        page.mouse.wheel(0, 120)
        _wait_slice(page, start + k)
    step_s = (time.perf_counter() - t) / 40
    assert errors == []
    assert load_s < 10 and step_s < 0.25, (load_s, step_s)
