"""The report renders in a real browser (headless Chromium) and every image in it is a valid inline PNG."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess

import pytest
from PIL import Image


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail("headless Chromium is required (Debian: apt-get install chromium)")


@pytest.mark.slow
def test_every_image_is_an_inline_png(report_run):
    text = report_run["html"].read_text()
    sources = re.findall(r'<img[^>]*\ssrc="([^"]*)"', text)
    assert len(sources) == text.count("<img") >= 8
    for source in sources:
        assert source.startswith("data:image/png;base64,"), source[:60]
        image = Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1], validate=True)))
        assert image.format == "PNG"
        image.load()  # decodes every pixel: a truncated PNG raises here
        assert image.width > 100 and image.height > 100


@pytest.mark.slow
def test_report_renders_in_headless_chromium(report_run, tmp_path):
    shot = tmp_path / "report.png"
    proc = subprocess.run(
        [
            chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}", "--window-size=1400,4000", report_run["html"].resolve().as_uri(),
        ],
        capture_output=True, text=True, timeout=120,
    )
    assert shot.exists(), proc.stderr[-2000:]
    image = Image.open(shot).convert("L")
    assert image.size == (1400, 4000)
    histogram = image.histogram()
    non_white = sum(histogram[:250]) / (image.width * image.height)
    assert non_white > 0.02, "the screenshot is (nearly) blank"
    # a real page has text, tables and plots: many grey levels, not a flat error page
    assert sum(1 for count in histogram if count > 50) > 40
