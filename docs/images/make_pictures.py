"""Draw docs/images/report.png, the README's picture of the demo's report, from a real report in a real browser.

Headless Chromium (software WebGL, as the report's browser test runs it) opens ``report.html``, waits until
its slice viewer has loaded (minutes on a busy CPU), and photographs the page's header (model, target) and
the viewer (its heading down to the slice views, the segmentation and the first map drawn over the scan),
one above the other; the picture is scaled to a width that keeps the file small. Run ``segxai demo`` first,
then, from the repository root::

    python docs/images/make_pictures.py [--report segxai-demo/report.html] [--out docs/images/report.png]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import tempfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from SegXAILib.tests.test_report_viewer import Chromium, chromium_binary  # noqa: E402  the tests' browser driver

WIDTH = 900  # pixels of the saved picture: readable on GitHub, under 300 KB
PARTS = (("header", "header"), ("#segxai-viewer h2", "#segxai-canvas"))
"""The parts of the page photographed, each from the top of its first element to the bottom of its last."""
GAP = 24  # white pixels between two parts


def viewer_ready(browser: Chromium) -> str:
    """Wait until the report's viewer has finished loading (minutes on a busy CPU: WebGL runs in software)."""
    return browser.wait_for("(() => { const s = document.getElementById('segxai-viewer');"
                            " return s && s.dataset.state !== 'loading' ? s.dataset.state : null; })()", 900)


def photograph(browser: Chromium, first: str, last: str, margin: int = 12) -> Image.Image:
    """The page from the top of element ``first`` to the bottom of element ``last`` (CSS selectors), as wide as
    the wider of the two, with ``margin`` pixels around."""
    left, top, right, bottom = browser.evaluate(
        f"(() => {{ const a = document.querySelector({json.dumps(first)}).getBoundingClientRect(),"
        f" b = document.querySelector({json.dumps(last)}).getBoundingClientRect();"
        " return [Math.min(a.left, b.left) + window.scrollX, a.top + window.scrollY,"
        " Math.max(a.right, b.right) + window.scrollX, b.bottom + window.scrollY]; })()")
    clip = {"x": max(left - margin, 0), "y": max(top - margin, 0), "scale": 1}
    clip.update(width=right + margin - clip["x"], height=bottom + margin - clip["y"])
    shot = browser.send("Page.captureScreenshot", format="png", captureBeyondViewport=True, clip=clip)
    return Image.open(io.BytesIO(base64.b64decode(shot["data"]))).convert("RGB")


def stack(parts: list[Image.Image]) -> Image.Image:
    """The parts one above the other on white, GAP pixels apart."""
    width = max(part.width for part in parts)
    picture = Image.new("RGB", (width, sum(part.height for part in parts) + GAP * (len(parts) - 1)), "white")
    top = 0
    for part in parts:
        picture.paste(part, (0, top))
        top += part.height + GAP
    return picture


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", type=Path, default=ROOT / "segxai-demo" / "report.html")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "report.png")
    args = parser.parse_args()
    binary = chromium_binary()
    if binary is None:
        sys.exit("error: no Chromium found (Debian: apt-get install chromium; or set SEGXAI_CHROMIUM)")
    with tempfile.TemporaryDirectory() as profile:
        browser = Chromium(binary, Path(profile))
        try:
            browser.send("Page.navigate", url=args.report.resolve().as_uri())
            state = viewer_ready(browser)
            if state != "ready":
                sys.exit(f"error: the report's viewer did not load ({state})")
            browser.settle()
            parts = [photograph(browser, first, last) for first, last in PARTS]
        finally:
            browser.close()
    picture = stack(parts)
    scale = WIDTH / picture.width
    picture = picture.resize((WIDTH, round(picture.height * scale)), Image.LANCZOS)
    picture.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(args.out, optimize=True)
    print(f"{args.out}: {picture.width}x{picture.height}, {args.out.stat().st_size // 1024} KB")


if __name__ == "__main__":
    main()
