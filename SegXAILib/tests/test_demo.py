"""`segxai demo` as a new user runs it: the bundled model, every method that applies, the packaged head."""

from __future__ import annotations

import json

import numpy as np
import pytest

from SegXAILib.cli import main
from SegXAILib.volume import read_volume


@pytest.mark.slow
def test_every_demo_map_carries_signal_and_plain_words(tmp_path, every_core):
    """Each map file the demo writes is finite everywhere and not constant inside the head (the Grad-CAM++ map
    was all zeros once), and no description shows a module name such as ``model.1.submodule.2`` (that name is
    kept in the map's ``layer`` field)."""
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--device", "cpu", "--progress", "none"]) == 0
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    scan = read_volume(out / "case" / "image.nii.gz").array
    head = scan > 0.05 * np.percentile(scan, 99)  # the packaged heads lie on a background of 0

    entries = summary["maps"]
    assert {e["file"] for e in entries} == {f"maps/{p.name}" for p in (out / "maps").iterdir()}
    assert {"gradcam", "gradcampp", "protoseg", "misure", "occlusion", "mcdropout", "tta", "ensemble"} <= {
        e["method"] for e in entries}
    flat = []
    for entry in entries:
        values = read_volume(out / entry["file"]).array
        if not np.isfinite(values).all() or not values[head].max() > values[head].min():
            flat.append(f"{entry['file']}: finite {bool(np.isfinite(values).all())}, inside the head "
                        f"{values[head].min()} to {values[head].max()}")
        assert "model." not in entry["description"] and "submodule" not in (entry["variant"] or "")
    assert not flat, flat
    layers = {e["method"]: e.get("layer") for e in entries if e["method"] in ("gradcam", "gradcampp")}
    assert layers == {"gradcam": "model.1.submodule.2", "gradcampp": "model.1.submodule.2"}
