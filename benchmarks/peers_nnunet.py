"""SegXAI's Grad-CAM of the bundled nnU-Net model beside nnunetv2-cam's, on the same case: seconds, memory, agreement.

The model is ``nnunet-lesion-tiny`` restricted to fold 0 (as ``nnUNetv2_predict -f 0``, nnU-Net's test-time
mirroring on); the case is the held-out scan of ``SegXAILib/tests/test_nnunet.py`` through nnU-Net's preprocessing;
the target the lesion (class 1); the layer the last decoder stage (its module name, e.g. ``decoder.stages.3``, is
what nnunetv2-cam's ``get_target_layer`` takes). Each row is a fresh child process (``peers.py``'s machinery): nnU-Net's
segmentation (fold 0, mirrored), one plain forward pass in nnU-Net's windows (timed: the "forward pass"), then
the tool's Grad-CAM, timed; the parent compares the maps (Pearson, on nnU-Net's preprocessed grid).

- SegXAI: its default Grad-CAM, in nnU-Net's windows (``SegXAILib/nnunet_windows.py``), of its score (the lesion's
  log-odds summed over R, the lesion nnU-Net's segmentation found), activations and gradients stitched with
  nnU-Net's Gaussian weights.
- nnunetv2-cam: ``compute_cam_with_sliding_window`` (``peer_adapters.nnunetv2_cam_gradcam``) on the same predictor
  and input. It takes no region: in each window it segments again (mirrored) and back-propagates the output summed
  over that window's lesion mask (every output channel, not only the lesion's); its windows' CAMs are min-max
  normalised one by one and averaged with equal weights. It runs on the GPU whenever CUDA is available (its target
  puts the mask there), so both rows run there when it is.

Columns as ``peers.py``'s; Pearson against SegXAI's map; on a GPU the note gives the peak GPU memory.

    python benchmarks/peers_nnunet.py              # the markdown table
    python benchmarks/peers_nnunet.py --json       # rows as JSON
    python benchmarks/peers_nnunet.py --repeat 3   # median of 3 child processes per row
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from peers import agreement, child_runs, print_rows, summary

TOOLS = ("segxai", "nnunetv2-cam")
FOLD = 0


def fold_zero_model(folder: Path) -> Path:
    """A copy of the bundled nnU-Net model in ``folder`` that uses fold 0 only (its ``segxai.json``'s ``folds``)."""
    from SegXAILib.models import registry

    model = shutil.copytree(registry.BUNDLED_DIR / "nnunet-lesion-tiny", folder / "nnunet-lesion-tiny-fold0")
    notes = json.loads((model / "segxai.json").read_text())
    (model / "segxai.json").write_text(json.dumps({**notes, "folds": [FOLD]}))
    return model


def held_out_context(folder: Path, device):
    """The held-out case written into ``folder``, preprocessed by nnU-Net and segmented by fold 0 (mirrored), as an
    :class:`~SegXAILib.explain.base.ExplainContext` for the lesion on nnU-Net's grid (image (1, 1, D, H, W)), and
    the seconds of one plain forward pass of fold 0 in nnU-Net's windows."""
    import torch

    from SegXAILib.explain.base import ExplainContext
    from SegXAILib.inference import sliding_window_predict
    from SegXAILib.models import registry
    from SegXAILib.tests.test_nnunet import held_out_case
    from SegXAILib.volume import read_volume

    scan_file, _ = held_out_case(folder)
    model = registry.load_model(fold_zero_model(folder))
    prepared = model.pipeline.preprocess([read_volume(scan_file)])
    probabilities = torch.softmax(model.pipeline.predict(prepared, device), 1)[0].numpy()
    model.network.to(device).eval()
    start = time.perf_counter()
    with torch.inference_mode():
        sliding_window_predict(model.network, prepared.image, model.card.windows, device)
    forward = time.perf_counter() - start
    return ExplainContext(model, prepared.image, "lesion", [1], probabilities, device), forward


def segxai_gradcam(context) -> np.ndarray:
    """SegXAI's default Grad-CAM map (the last decoder stage, nnU-Net's windows), (D, H, W) float32."""
    from SegXAILib.methods import get_explainer

    return next(m.array for m in get_explainer("gradcam").explain(context).maps if m.variant is None)


def run_one(tool: str, out: Path) -> dict:
    """In this process: the case, its segmentation and forward pass, then the tool's Grad-CAM; the map saved to
    ``out``."""
    import peer_adapters
    import torch
    from memory import peak_rss_gb

    from SegXAILib.explain.gradcam import probe_input
    from SegXAILib.explain.layers import DEFAULT_LAYER, resolve_layers

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as folder:
        context, forward = held_out_context(Path(folder), device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if tool == "segxai":
        array = segxai_gradcam(context)
    else:
        layer = resolve_layers(context.model.network, DEFAULT_LAYER, probe_input(context))[0][0]
        array = peer_adapters.nnunetv2_cam_gradcam(context.model.pipeline.predictor, context.image[0], layer)
    seconds = time.perf_counter() - start
    np.save(out, np.asarray(array, np.float32))
    gpu = torch.cuda.max_memory_allocated() / 1024**3 if device.type == "cuda" else None
    return {"forward": forward, "seconds": seconds, "peak_gb": peak_rss_gb(), "gpu_peak_gb": gpu,
            "grid": "x".join(map(str, context.image.shape[2:][::-1])), "device": device.type}


def row(tool: str, folder: Path, repeat: int) -> dict:
    """One row from ``repeat`` child processes; ``note`` says why it failed (nnunetv2-cam: its import's error)."""
    import peer_adapters

    result = {"tool": tool, "method": "gradcam", "size": "held-out", "seconds": None, "peak_gb": None,
              "pearson_vs_reference": None, "note": ""}
    failure = None if tool == "segxai" else peer_adapters.import_failure(tool)
    if failure:
        return {**result, "note": f"fails: {failure}"}
    runs = child_runs([tool, str(folder / f"{tool}.npy")], repeat, script=__file__)
    if isinstance(runs, str):
        return {**result, "note": f"fails: {runs}"}
    gpu = runs[0]["gpu_peak_gb"] and max(r["gpu_peak_gb"] for r in runs)
    return {**result, **summary(runs), "size": f"held-out {runs[0]['grid']} ({runs[0]['device']})",
            "note": f"GPU peak {gpu:.2f} GB" if gpu else ""}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print the rows as a JSON list")
    parser.add_argument("--repeat", type=int, default=1, help="child processes per row (median seconds)")
    parser.add_argument("--one", nargs=2, metavar=("TOOL", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], Path(args.one[1]))))
        return

    def rows(folder: Path) -> Iterator[dict]:
        for tool in TOOLS:
            result = row(tool, folder, args.repeat)
            agreement(result, folder / f"{tool}.npy", folder / "segxai.npy")
            yield result

    with tempfile.TemporaryDirectory() as folder:
        print_rows(rows(Path(folder)), args.json)


if __name__ == "__main__":
    main()
