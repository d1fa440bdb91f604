"""The report's interactive viewer: what it embeds (exact enough, within its size rule) and what a browser shows.

The encoding tests read the embedded NIfTI files back with nibabel, independently of the code that wrote
them. The browser test opens a real report in headless Chromium (software WebGL, no GPU), driven through the
DevTools protocol: the viewer must start without a console error, a layer switched off must change the
picture and switched on again restore it, the threshold must hide part of a map, and a click must give the
values under the cross in words. It is skipped only where no Chromium is installed (Debian: apt package
``chromium``; or set ``SEGXAI_CHROMIUM`` to a Chromium or Chrome binary).
"""

from __future__ import annotations

import base64
import gzip
import html
import io
import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import nibabel
import numpy as np
import pytest
from PIL import Image

from SegXAILib.errors import SegXAIError
from SegXAILib.report import viewer, write_report
from SegXAILib.report.display import display_range, head_mask
from SegXAILib.report.viewer import (
    downsample,
    encode_labels,
    encode_map,
    encode_scan,
    fit,
    nifti_gz,
    niivue_script,
    viewer_layers,
)
from SegXAILib.volume import Volume, read_volume, write_volume

SHAPE = (24, 30, 36)  # K, J, I
SPACING = (1.5, 1.0, 2.0)  # along I, J, K


def read_back(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """An embedded volume as nibabel reads it: values (K, J, I), scaling applied, and its affine."""
    image = nibabel.Nifti1Image.from_bytes(gzip.decompress(data))
    return np.asarray(image.get_fdata()).transpose(2, 1, 0), image.affine


def grid(array: np.ndarray) -> Volume:
    return Volume(array, spacing=SPACING, origin=(-20.0, 15.0, -7.5), direction=np.diag([-1.0, -1.0, 1.0]))


# ------------------------------------------------------------------ encoding
def test_nifti_keeps_the_grid_and_the_voxel_order():
    array = np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE)
    volume = grid(array)
    values, affine = read_back(nifti_gz(array, volume.ijk_to_ras))
    np.testing.assert_array_equal(values, array)
    np.testing.assert_allclose(affine, volume.ijk_to_ras, atol=1e-6)


def test_scan_is_exact_when_integer_and_within_a_step_otherwise():
    rng = np.random.default_rng(0)
    ct = grid(rng.integers(-1024, 3000, SHAPE).astype(np.float32))  # integer values stored as float: exact
    np.testing.assert_array_equal(read_back(encode_scan(ct))[0], ct.array)
    mri = grid((rng.standard_normal(SHAPE) * 300 + 1000).astype(np.float32))
    lo, hi = float(mri.array.min()), float(mri.array.max())
    back = read_back(encode_scan(mri))[0]
    assert np.abs(back - mri.array).max() <= (hi - lo) / 65535 * 0.51 + 1e-3
    with_nan = mri.array.copy()
    with_nan[0, 0, 0] = np.nan
    assert np.isfinite(read_back(encode_scan(mri.with_array(with_nan)))[0]).all()


def test_labels_are_exact_and_maps_within_half_a_step_of_their_range():
    labels = np.zeros(SHAPE, np.uint8)
    labels[5:9, 6:12, 7:20] = 4
    labels[6:8, 8:10, 9:12] = 1
    np.testing.assert_array_equal(read_back(encode_labels(grid(labels)))[0], labels)
    big = labels.astype(np.int32) * 100  # label 400: kept exact in 16 bits
    np.testing.assert_array_equal(read_back(encode_labels(grid(big)))[0], big)

    k, j, i = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")
    saliency = np.exp(-((i - 18) ** 2 + (j - 15) ** 2 + (k - 12) ** 2) / 40.0).astype(np.float32)
    value_range = (float(saliency.min()), float(saliency.max()))
    back = read_back(encode_map(grid(saliency), value_range))[0]
    assert np.abs(back - saliency).max() <= (value_range[1] - value_range[0]) / 510 + 1e-6
    flat = read_back(encode_map(grid(np.full(SHAPE, 0.3, np.float32)), (0.3, 0.3)))[0]
    np.testing.assert_allclose(flat, 0.3, atol=1e-6)


def test_downsampling_keeps_the_anatomy_in_place():
    k, j, i = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")
    blob = ((i - 20) ** 2 + (j - 11) ** 2 + (k - 9) ** 2 <= 16).astype(np.float32)
    volume = grid(blob)

    def centre_ras(v: Volume) -> np.ndarray:
        kji = np.argwhere(v.array > 0.5 * v.array.max()) if v.array.dtype.kind == "f" else np.argwhere(v.array)
        weights = v.array[tuple(kji.T)].astype(np.float64)
        ijk = (kji[:, ::-1] * weights[:, None]).sum(axis=0) / weights.sum()
        return (v.ijk_to_ras @ np.append(ijk, 1.0))[:3]

    for factor in (2, 3):
        coarse = downsample(volume, factor)
        assert coarse.shape == tuple(-(-n // factor) for n in SHAPE)
        np.testing.assert_allclose(coarse.spacing, np.asarray(SPACING) * factor)
        np.testing.assert_allclose(centre_ras(coarse), centre_ras(volume), atol=0.6 * max(SPACING))
        labels = downsample(grid(blob.astype(np.uint8)), factor, labels=True)
        assert set(np.unique(labels.array)) <= {0, 1}
        np.testing.assert_allclose(centre_ras(labels), centre_ras(volume), atol=0.6 * max(SPACING) * factor)


def test_fit_coarsens_until_the_budget_is_met():
    rng = np.random.default_rng(1)
    noise = grid(rng.random(SHAPE).astype(np.float32))  # incompressible: gzip cannot rescue it
    full, factor = fit(lambda v: encode_map(v, (0.0, 1.0)), noise, 10**9)
    assert factor == 1
    data, factor = fit(lambda v: encode_map(v, (0.0, 1.0)), noise, len(full) // 5)
    assert factor >= 2 and viewer.base64_size(len(data)) <= len(full) // 5
    assert read_back(data)[0].shape == downsample(noise, factor).shape


def test_the_pinned_niivue_is_checked(tmp_path, monkeypatch):
    assert "Niivue" in niivue_script()
    altered = tmp_path / "niivue.umd.js"
    altered.write_text("window.niivue = {};")
    monkeypatch.setattr(viewer, "NIIVUE_JS", altered)
    with pytest.raises(SegXAIError, match="not the pinned NiiVue"):
        niivue_script()


# ------------------------------------------------------------------ the page
@pytest.fixture
def case_folder(tmp_path):
    """An output folder as 'segxai explain' writes it: a scan with a blob, its labels, two maps, summary.json."""
    k, j, i = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")
    r2 = (i - 20) ** 2 + (j - 14) ** 2 + (k - 11) ** 2
    rng = np.random.default_rng(0)
    scan = grid((100.0 * (r2 <= 36) + 20 + 3 * rng.standard_normal(SHAPE)).astype(np.float32))
    labels = np.where(r2 <= 9, 1, np.where(r2 <= 36, 4, 0)).astype(np.uint8)
    saliency = np.exp(-r2 / 30.0).astype(np.float32)
    entropy = (0.8 * np.exp(-np.abs(np.sqrt(r2) - 6.0))).astype(np.float32)
    # signed: a positive lobe right of the centre, a negative one left of it, both in the first slices shown
    signed = (np.exp(-((i - 15) ** 2 + (j - 14) ** 2 + (k - 11) ** 2) / 6.0)
              - np.exp(-((i - 25) ** 2 + (j - 14) ** 2 + (k - 11) ** 2) / 6.0)).astype(np.float32)
    write_volume(scan, tmp_path / "case" / "image.nii.gz")
    out = tmp_path / "out"
    write_volume(scan.with_array(labels), out / "segmentation.nii.gz")
    write_volume(scan.with_array(saliency), out / "maps" / "gradcam_blob.nii.gz")
    write_volume(scan.with_array(entropy), out / "maps" / "tta-entropy_blob.nii.gz")
    write_volume(scan.with_array(signed), out / "maps" / "saliency-signed_blob.nii.gz")
    maps = [
        {"file": "maps/gradcam_blob.nii.gz", "method": "gradcam", "variant": None, "class": "blob",
         "description": "where the features raise the blob logits", "colormap": "inferno", "threshold": 0.2,
         "normalised": True, "range": [float(saliency.min()), float(saliency.max())], "seconds": 1.0},
        {"file": "maps/tta-entropy_blob.nii.gz", "method": "tta", "variant": "entropy", "class": "blob",
         "description": "predictive entropy in nats", "colormap": "viridis", "threshold": 0.2,
         "normalised": False, "range": [float(entropy.min()), float(entropy.max())], "seconds": 2.0},
        {"file": "maps/saliency-signed_blob.nii.gz", "method": "saliency", "variant": "signed", "class": "blob",
         "description": "positive where a brighter scan raises the blob", "colormap": "RdBu_r", "threshold": 0.0,
         "normalised": False, "range": [float(signed.min()), float(signed.max())], "seconds": 1.0},
    ]
    summary = {
        "input": str(tmp_path / "case" / "image.nii.gz"),
        "model": {"name": "tiny", "architecture": "unet"},
        "classes": [{"name": "background", "label": 0, "color": [0, 0, 0]},
                    {"name": "core", "label": 1, "color": [255, 64, 64]},
                    {"name": "rim", "label": 4, "color": [128, 128, 128]}],
        "files": {"segmentation": "segmentation.nii.gz"}, "device": "cpu", "versions": {"segxai": "0.1.0"},
        "target": {"name": "blob", "labels": [1, 4]}, "maps": maps, "explanations": [], "scores": {},
    }
    (out / "summary.json").write_text(json.dumps(summary))
    return out, summary


def test_the_page_embeds_every_layer_by_the_report_s_names(case_folder):
    folder, summary = case_folder
    page = write_report(folder).read_text(encoding="utf-8")
    section = page[page.index('<section class="segxai-viewer"'):]
    section = section[: section.index("</section>")]
    for name in ("segmentation", "Grad-CAM (blob)", "test-time augmentation: entropy (total uncertainty) (blob)",
                 "saliency: signed (blob)"):
        assert f">{html.escape(name)}</label>" in section, name
    config = json.loads(re.search(r'<script type="application/json" id="segxai-viewer-config">(.*?)</script>',
                                  section, re.S).group(1))
    assert [layer["kind"] for layer in config["layers"]] == ["scan", "segmentation", "map", "map", "map"]
    blocks = re.findall(r'<script type="application/octet-stream" id="(segxai-volume-\d+)">([^<]*)</script>', section)
    assert [b[0] for b in blocks] == [layer["block"] for layer in config["layers"]]
    labels = read_back(base64.b64decode(blocks[1][1]))[0]
    np.testing.assert_array_equal(labels, read_volume_array(folder / "segmentation.nii.gz"))
    # every map on its display range (the montages' colour bar), its threshold where the pictures put it
    scan = read_volume(summary["input"])
    head = head_mask(scan.array)
    for layer, item in zip(config["layers"][2:], summary["maps"]):
        display = display_range(read_volume(folder / item["file"]).array, head, item)
        assert (layer["cal_min"], layer["cal_max"]) == pytest.approx((display.low, display.high))
        assert layer["threshold"] == pytest.approx(display.cutoff) and layer["factor"] == 1
        assert layer["signed"] == display.signed == (item["variant"] == "signed")
        assert layer["caption"] == display.caption()
    signed = config["layers"][4]
    assert signed["cal_min"] == -signed["cal_max"] and signed["matplotlib"] == "RdBu_r"
    assert "@media print{.segxai-viewer{display:none}}" in section  # paper gets the pictures


def test_names_cannot_break_out_of_the_page_s_scripts(case_folder):
    folder, summary = case_folder
    summary["maps"][0]["class"] = "blob </script><!-- <script>"
    (folder / "summary.json").write_text(json.dumps(summary))
    page = write_report(folder).read_text(encoding="utf-8")
    assert page.count("<script") - page.count("</script>") == 1  # NiiVue's own text holds one "<script" in a string
    assert "Grad-CAM (blob &lt;/script&gt;&lt;!-- &lt;script&gt;)</label>" in page


def read_volume_array(path: Path) -> np.ndarray:
    image = nibabel.load(str(path))
    return np.asarray(image.dataobj).transpose(2, 1, 0)


def test_the_size_rule_coarsens_the_maps_first(case_folder):
    folder, summary = case_folder
    rng = np.random.default_rng(2)
    scan, labels = read_volume(summary["input"]), read_volume(folder / "segmentation.nii.gz")
    for n in range(3):  # noise: maps that gzip cannot shrink, larger together than the scan
        write_volume(scan.with_array(rng.random(SHAPE).astype(np.float32)), folder / "maps" / f"noise{n}.nii.gz")
    summary["maps"] = [{"file": f"maps/noise{n}.nii.gz", "method": f"noise{n}", "class": "blob", "range": [0.0, 1.0],
                        "threshold": 0.2, "colormap": "viridis"} for n in range(3)]

    def sizes(layers):
        return [viewer.base64_size(len(layer.data)) for layer in layers]

    full = viewer_layers(folder, summary, scan, labels, (0.0, 100.0))
    assert [layer.factor for layer in full] == [1] * 5
    scan_and_labels = sum(sizes(full[:2]))
    assert sum(sizes(full[2:])) > scan_and_labels
    budget = int(scan_and_labels / viewer.SCAN_SHARE) + 8  # the scan and labels just fit: the maps have the rest
    small = viewer_layers(folder, summary, scan, labels, (0.0, 100.0), budget=budget)
    assert [layer.factor for layer in small[:2]] == [1, 1] and all(layer.factor > 1 for layer in small[2:])
    assert sum(sizes(small)) <= budget
    assert "coarser" in viewer._layer_row(2, small[2]) and "full resolution" in viewer._layer_row(1, small[1])

    tiny = viewer_layers(folder, summary, scan, labels, (0.0, 100.0), budget=scan_and_labels // 2)
    assert tiny[0].factor == tiny[1].factor > 1  # even the scan is too large: scan and labels on one coarser grid
    assert read_back(tiny[1].data)[0].shape == read_back(tiny[0].data)[0].shape


# ------------------------------------------------------------------ in a browser
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox",  # root in CI: Chromium's sandbox refuses to start as root
    "--use-angle=swiftshader", "--enable-unsafe-swiftshader",  # WebGL2 in software: no GPU, no display
    "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check", "--disable-extensions",
    "--mute-audio", "--hide-scrollbars", "--window-size=1280,1600", "--remote-debugging-port=0",
]


def chromium_binary() -> str | None:
    named = os.environ.get("SEGXAI_CHROMIUM")
    if named:
        return named
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome",
                                                 "google-chrome-stable"))), None)


class Chromium:
    """Headless Chromium driven through the DevTools protocol: one page, its console errors collected."""

    def __init__(self, binary: str, profile: Path):
        import websocket  # the 'test' extra's websocket-client

        self.process = subprocess.Popen([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"  # Chromium writes the port it chose here
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.close()
                raise RuntimeError(f"{binary} did not start (exit code {self.process.poll()})")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30) as response:
            page = next(t for t in json.load(response) if t["type"] == "page")
        self.socket = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=120, suppress_origin=True)
        self.events: list[dict] = []
        self.last_id = 0
        for domain in ("Runtime", "Log", "Page"):
            self.send(f"{domain}.enable")

    def send(self, method: str, **params) -> dict:
        self.last_id += 1
        self.socket.send(json.dumps({"id": self.last_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == self.last_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]
            self.events.append(message)

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, seconds: float):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.25)
        raise TimeoutError(f"{expression} still false after {seconds} s")

    def settle(self) -> None:
        """Let the page draw what the last change asked for."""
        self.evaluate("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(() => setTimeout(r, 50))))")

    def screenshot(self, selector: str) -> np.ndarray:
        x, y, width, height = self.evaluate(
            f"(() => {{ const r = document.querySelector({json.dumps(selector)}).getBoundingClientRect();"
            " return [r.x + window.scrollX, r.y + window.scrollY, r.width, r.height]; })()")
        shot = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                         clip={"x": x, "y": y, "width": width, "height": height, "scale": 1})
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(shot["data"]))).convert("RGB")).astype(int)

    def console_errors(self) -> list[str]:
        errors = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                errors.append(" ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
            elif method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                errors.append((details.get("exception") or {}).get("description") or details["text"])
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                errors.append(params["entry"]["text"])
        return errors

    def close(self) -> None:
        if getattr(self, "socket", None) is not None:
            self.socket.close()
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def browser(tmp_path):
    binary = chromium_binary()
    if binary is None:
        pytest.skip("no Chromium found (Debian: apt-get install chromium; or set SEGXAI_CHROMIUM)")
    chromium = Chromium(binary, tmp_path / "chromium-profile")
    yield chromium
    chromium.close()


def changed(before: np.ndarray, after: np.ndarray) -> int:
    """Pixels that differ between two pictures of the same size."""
    assert before.shape == after.shape
    return int((np.abs(before - after).sum(axis=-1) > 0).sum())


@pytest.mark.slow
def test_the_viewer_runs_in_a_browser(case_folder, browser):
    folder, _ = case_folder
    report = write_report(folder)
    browser.send("Page.navigate", url=report.resolve().as_uri())
    state = browser.wait_for("(() => { const s = document.getElementById('segxai-viewer');"
                             " return s && s.dataset.state !== 'loading' ? s.dataset.state : null; })()", 120)
    location = browser.evaluate("document.getElementById('segxai-location').innerText")
    assert state == "ready", location
    assert browser.console_errors() == []
    # the cross starts at the object's centre, the slices of the pictures: it reads the core's label
    assert "segmentation: core (label 1)" in location and "Grad-CAM (blob): " in location

    browser.evaluate("document.getElementById('segxai-canvas').scrollIntoView()")
    browser.settle()
    before = browser.screenshot("#segxai-canvas")
    assert len(np.unique(before.reshape(-1, 3), axis=0)) > 50  # a picture, not a blank canvas

    browser.evaluate("document.getElementById('segxai-layer-2').click()")  # gradcam off
    browser.settle()
    without = browser.screenshot("#segxai-canvas")
    assert changed(before, without) > 500
    assert "[hidden]" in browser.evaluate("document.getElementById('segxai-location').innerText")
    browser.evaluate("document.getElementById('segxai-layer-2').click()")  # and on again
    browser.settle()
    assert changed(before, browser.screenshot("#segxai-canvas")) < 0.001 * before[..., 0].size

    browser.evaluate("(() => { const t = document.querySelector('input[data-threshold=\"2\"]');"
                     " t.value = t.max; t.dispatchEvent(new Event('input')); })()")  # gradcam drawn from its top
    browser.settle()
    thresholded = browser.screenshot("#segxai-canvas")
    assert changed(before, thresholded) > 500
    assert changed(without, thresholded) < changed(before, thresholded)  # nearly all of the map is gone

    axial = "Number(document.querySelector('input[data-plane=\"2\"]').value)"
    start = browser.evaluate(axial)
    browser.evaluate("document.getElementById('segxai-canvas').focus()")
    for kind in ("keyDown", "keyUp"):  # the arrow keys scroll through the slices (of the axial plane at first)
        browser.send("Input.dispatchKeyEvent", type=kind, key="ArrowUp", code="ArrowUp", windowsVirtualKeyCode=38)
    browser.settle()
    assert browser.evaluate(axial) == start + 1

    before_click = browser.evaluate("document.getElementById('segxai-location').innerText")
    x, y = browser.evaluate("(() => { const r = document.getElementById('segxai-canvas').getBoundingClientRect();"
                            " return [r.x + 0.1 * r.width, r.y + 0.5 * r.height]; })()")  # left of the first picture
    for kind in ("mousePressed", "mouseReleased"):  # a click moves the cross: the values under it are read out
        browser.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)
    browser.settle()
    after_click = browser.evaluate("document.getElementById('segxai-location').innerText")
    assert after_click != before_click and after_click.startswith("Cross at voxel (i, j, k) = (")

    browser.evaluate("(() => { const s = document.querySelector('input[data-plane=\"2\"]');"
                     " s.value = '0'; s.dispatchEvent(new Event('input')); })()")  # the lowest axial slice
    browser.settle()
    location = browser.evaluate("document.getElementById('segxai-location').innerText")
    assert "segmentation: background (label 0)" in location
    assert browser.evaluate("document.querySelector('output[data-plane-value=\"2\"]').textContent").startswith("1 of ")
    assert browser.console_errors() == []


def red_and_blue(picture: np.ndarray) -> tuple[int, int]:
    """Pixels clearly red and clearly blue (the two sides of the blue-white-red colour map) in the slices: above
    NiiVue's colour bar (the bottom 15% of the canvas), the cyan cross left out."""
    slices = picture[: int(0.85 * picture.shape[0])]
    r, g, b = slices[..., 0], slices[..., 1], slices[..., 2]
    return int(((r - b > 50) & (r - g > 30)).sum()), int(((b - r > 50) & (g < 200)).sum())


@pytest.mark.slow
def test_a_signed_map_is_thresholded_on_both_sides_in_a_browser(case_folder, browser):
    folder, _ = case_folder
    browser.send("Page.navigate", url=write_report(folder).resolve().as_uri())
    state = browser.wait_for("(() => { const s = document.getElementById('segxai-viewer');"
                             " return s && s.dataset.state !== 'loading' ? s.dataset.state : null; })()", 120)
    assert state == "ready", browser.evaluate("document.getElementById('segxai-location').innerText")
    for layer in (1, 2, 4):  # segmentation and gradcam off (red labels would count), the signed map on
        browser.evaluate(f"document.getElementById('segxai-layer-{layer}').click()")
    browser.evaluate("document.getElementById('segxai-canvas').scrollIntoView()")
    browser.settle()
    red, blue = red_and_blue(browser.screenshot("#segxai-canvas"))
    assert red > 200 and blue > 200  # both lobes drawn, in their own colours

    def threshold(fraction: float) -> tuple[int, int]:
        browser.evaluate("(() => { const t = document.querySelector('input[data-threshold=\"4\"]');"
                         f" t.value = String({fraction} * Number(t.max)); t.dispatchEvent(new Event('input')); }})()")
        browser.settle()
        return red_and_blue(browser.screenshot("#segxai-canvas"))

    high_red, high_blue = threshold(0.7)
    assert 0 < high_red < 0.5 * red and 0 < high_blue < 0.5 * blue  # |value| < t hidden on both sides, both kept
    assert browser.evaluate("document.querySelector('output[data-threshold-value=\"4\"]').textContent").startswith(
        "|value| \u2265 ")
    top_red, top_blue = threshold(1.0)  # only the values at the range's ends (clipped there) are left
    assert top_red < 0.1 * red and top_blue < 0.1 * blue
    assert browser.console_errors() == []
