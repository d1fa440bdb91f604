"""SegXAI beside other explanation tools: one network, one scan, one target score; seconds, memory, agreement.

Each row runs in a fresh child process: one sliding-window forward pass (the segmentation, which gives R), then
the tool's method, timed; the child's map is saved and compared by the parent. The network is the bundled
brain-lesion U-Net, the scan ``explainers.synthetic_scan``, the target "whole tumour", the score SegXAI's (the
target's log-odds summed over R, the predicted tumour), the layer the last decoder stage. Every tool gets that
score and layer (``peer_adapters.py`` says how); the peers run the whole scan in one pass (none of them has
sliding windows), and so does SegXAI's row (option ``window: scan``); ``segxai-default`` is SegXAI as it runs by
default (:data:`ROWS`).

Columns: seconds of the method; its ratio to the forward pass of the same child; the child's peak resident
memory (``VmHWM``, model and forward pass included); Pearson correlation of the map with a reference (Grad-CAM
and Grad-CAM++: ``peer_adapters.brute_force_gradcam``, the definition in one autograd pass of the whole scan;
occlusion and integrated gradients: SegXAI's map); and "fails" with the reason when a tool cannot run the case.
Equal settings: occlusion cubes of 16 voxels every 8 over R's bounding box at the scan's no-signal value;
integrated gradients 16 trapezoid steps from that value, 4 copies per pass.

    python benchmarks/peers.py --size 96                              # the markdown table
    python benchmarks/peers.py --size 128 --json                      # rows as JSON
    python benchmarks/peers.py --size 96 --methods gradcam --repeat 3  # median of 3 child processes per row
    python benchmarks/peers.py --size 128 --methods occlusion --tools segxai,monai   # those rows only
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from explainers import SIZES

ROWS = [("segxai", "gradcam"), ("segxai-default", "gradcam"), ("monai", "gradcam"), ("captum", "gradcam"),
        ("pytorch-grad-cam", "gradcam"), ("medcam", "gradcam"), ("segxai", "gradcampp"),
        ("segxai-default", "gradcampp"), ("monai", "gradcampp"), ("captum", "gradcampp"),
        ("pytorch-grad-cam", "gradcampp"), ("medcam", "gradcampp"), ("segxai", "occlusion"),
        ("segxai-default", "occlusion"), ("monai", "occlusion"), ("segxai", "integrated-gradients"),
        ("segxai-default", "integrated-gradients"), ("captum", "integrated-gradients")]
"""(tool, method) rows; ``segxai`` does the peers' work (the whole scan in one pass), ``segxai-default`` what
SegXAI does by default: Grad-CAM in the model's sliding windows, as its segmentation ran; the black-box methods
on R's bounding box grown by 16 voxels, in the model's windows where that is larger than one (less work at 96^3;
the maps differ where the network sees the whole scan, e.g. through instance normalisation)."""
REFERENCES = {"gradcam": ("reference", "gradcam"), "gradcampp": ("reference", "gradcampp"),
              "occlusion": ("segxai", "occlusion"), "integrated-gradients": ("segxai", "integrated-gradients")}
UNSUPPORTED = {("captum", "gradcampp"): "captum has no Grad-CAM++"}
CUBE, STRIDE, STEPS, BATCH = 16, 8, 16, 4


def occlusion_cubes(region) -> tuple[list[list[int]], int]:
    """SegXAI's cube starts per axis over R's bounding box at the benchmark's settings, and how many cubes."""
    from SegXAILib.explain.blackbox import bounding_box
    from SegXAILib.explain.occlusion import OcclusionSensitivity

    starts, _, _ = OcclusionSensitivity.placement(bounding_box(region), region.shape, CUBE, STRIDE, 10**6)
    return starts, math.prod(len(s) for s in starts)


def _segxai(context, method: str, default: bool = False):
    """SegXAI's map of ``method`` at the benchmark's settings, (D, H, W) float32: every method in one pass over
    the scan (``window: scan``), occlusion and integrated gradients on the whole grid (``margin: null``), as the
    peers, or with ``default`` in SegXAI's default windows and crop (:data:`ROWS`)."""
    from SegXAILib.methods import get_explainer

    if method == "occlusion":
        context.options = {"occlusion": {"cube": CUBE, "stride": STRIDE, "batch": BATCH,
                                         "max_cubes": occlusion_cubes(context.predicted_mask)[1]}}
    if method == "integrated-gradients":
        context.options = {"integrated-gradients": {"steps": STEPS, "method": "trapezoid", "batch": BATCH}}
    if not default:
        context.options.setdefault(method, {})["window"] = "scan"
        if method in ("occlusion", "integrated-gradients"):
            context.options[method]["margin"] = None
    maps = get_explainer(method).explain(context).maps
    return next(m.array for m in maps if m.variant == ("signed" if method == "integrated-gradients" else None))


def _peer(problem, tool: str, method: str):
    """The peer's map (``peer_adapters``) at the benchmark's settings; MONAI's occlusion box is chosen so that its
    cubes are SegXAI's (it starts them (CUBE - 1) // 2 voxels before the box)."""
    import peer_adapters as peers

    if method == "gradcam":
        return peers.GRADCAM_PEERS[tool](problem)
    if method == "gradcampp":
        return peers.GRADCAMPP_PEERS[tool](problem)
    if method == "occlusion":
        starts, _ = occlusion_cubes(problem.region)
        edge = (CUBE - 1) // 2
        box = (tuple(s[0] + edge for s in starts), tuple(s[-1] + CUBE - edge for s in starts))
        return peers.monai_occlusion(problem, CUBE, STRIDE, box, BATCH)
    return peers.captum_integrated_gradients(problem, STEPS, BATCH)


def run_one(size: str, tool: str, method: str, out: Path) -> dict:
    """In this process: the forward pass, then the tool's method; the map saved to ``out``."""
    import numpy as np
    import torch
    from explainers import model_for, synthetic_scan
    from memory import peak_rss_gb
    from peer_adapters import Problem, brute_force_gradcam

    from SegXAILib.explain.base import ExplainContext
    from SegXAILib.explain.layers import resolve_layers
    from SegXAILib.inference import predict_probabilities
    from SegXAILib.preprocessing import no_signal_level

    torch.manual_seed(0)
    model = model_for("gradcam")
    image = synthetic_scan(SIZES[size])
    device = torch.device("cpu")
    start = time.perf_counter()
    probabilities = predict_probabilities(model, image, device)
    forward = time.perf_counter() - start
    _, channels = model.card.target_channels(None)
    x = torch.from_numpy(image)[None, None]
    context = ExplainContext(model=model, image=x, target="whole tumour", channels=channels,
                             probabilities=probabilities, device=device)
    if tool in ("segxai", "segxai-default"):
        start = time.perf_counter()
        array = _segxai(context, method, default=tool == "segxai-default")
    else:
        window = x[(..., *(slice(0, p) for p in model.card.patch_size))]
        layer = resolve_layers(model.network, "last_decoder", window)[0][0]
        problem = Problem(model.network, x, channels, context.predicted_mask, layer, model.card.output,
                          no_signal_level(image))
        start = time.perf_counter()
        array = brute_force_gradcam(problem, method == "gradcampp") if tool == "reference" else \
            _peer(problem, tool, method)
    seconds = time.perf_counter() - start
    np.save(out, np.asarray(array, np.float32))
    return {"forward": forward, "seconds": seconds, "peak_gb": peak_rss_gb()}


MEMORY_CAP_GB = 16.0
"""Address space each child may take (``RLIMIT_AS``), so that a tool needing more fails with its own out-of-memory
error instead of swapping the machine (23 GB here) for hours: the same cap for every tool."""


def _capped(gigabytes: float):
    """A ``preexec_fn`` limiting the child's address space to ``gigabytes``."""
    def limit() -> None:
        import resource

        cap = int(gigabytes * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    return limit


def child_runs(arguments: list[str], repeat: int, script: str = __file__,
               memory_gb: float = MEMORY_CAP_GB) -> list[dict] | str:
    """``repeat`` runs of ``script --one *arguments``, each in a fresh child process limited to ``memory_gb`` of
    address space: the JSON object each printed last, or why the first failing run failed (the last line of its
    error output)."""
    runs = []
    for _ in range(repeat):
        child = subprocess.run([sys.executable, script, "--one", *arguments], capture_output=True, text=True,
                               preexec_fn=_capped(memory_gb))
        if child.returncode != 0:
            lines = child.stderr.strip().splitlines() or [f"exit status {child.returncode} (out of memory?)"]
            return lines[-1][:160]
        runs.append(json.loads(child.stdout.strip().splitlines()[-1]))
    return runs


def summary(runs: list[dict]) -> dict:
    """Median seconds and forward pass, largest peak memory of a row's child processes."""
    import statistics

    return {"seconds": round(statistics.median(r["seconds"] for r in runs), 2),
            "peak_gb": round(max(r["peak_gb"] for r in runs), 2),
            "forward": statistics.median(r["forward"] for r in runs)}


def row(size: str, tool: str, method: str, folder: Path, repeat: int = 1) -> dict:
    """One row from ``repeat`` child processes (median seconds, largest peak); ``note`` says why it failed."""
    import peer_adapters

    result = {"tool": tool, "method": method, "size": "x".join(map(str, SIZES[size][::-1])), "seconds": None,
              "peak_gb": None, "pearson_vs_reference": None, "note": ""}
    failure = UNSUPPORTED.get((tool, method)) or (None if tool in ("segxai", "segxai-default", "reference") else
                                                  peer_adapters.import_failure(tool))
    if failure:
        return {**result, "note": f"fails: {failure}"}
    runs = child_runs([size, tool, method, str(folder / f"{tool}-{method}.npy")], repeat)
    return {**result, "note": f"fails: {runs}"} if isinstance(runs, str) else {**result, **summary(runs)}


def agreement(result: dict, mine: Path, reference: Path) -> None:
    """Sets ``result``'s Pearson correlation of the saved maps ``mine`` and ``reference`` (when both were saved), and
    its note when the correlation is undefined (a constant or non-finite map)."""
    import numpy as np
    from peer_adapters import pearson

    if not (mine.exists() and reference.exists()):
        return
    r = pearson(np.load(mine), np.load(reference))
    result["pearson_vs_reference"] = None if math.isnan(r) else round(r, 4)
    if math.isnan(r):
        finite = bool(np.isfinite(np.load(mine)).any())
        result["note"] = "fails: the map is constant" if finite else "fails: the map is NaN or infinite"


HEADER = ("| scan | method | tool | seconds | x forward pass | peak RSS (GB) | Pearson vs reference | note |\n"
          "|---|---|---|---|---|---|---|---|")


def table_line(result: dict) -> str:
    """One row of the markdown table (:data:`HEADER`); blank where a figure is missing."""
    ratio = f"{result['seconds'] / result['forward']:.2f}x" if result["seconds"] is not None else ""
    r = result["pearson_vs_reference"]
    return (f"| {result['size']} | {result['method']} | {result['tool']} | {result['seconds'] or ''} | {ratio} | "
            f"{result['peak_gb'] or ''} | {'' if r is None else r} | {result['note']} |")


def print_rows(rows: Iterable[dict], as_json: bool) -> None:
    """Each row as a line of the markdown table as soon as it is measured, or all of them at the end as a JSON
    list (the parent's ``forward`` seconds left out)."""
    if not as_json:
        print(HEADER)
    done = []
    for result in rows:
        done.append(result)
        if not as_json:
            print(table_line(result), flush=True)
    if as_json:
        print(json.dumps([{k: v for k, v in r.items() if k != "forward"} for r in done], indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="96", choices=sorted(SIZES))
    parser.add_argument("--json", action="store_true", help="print the rows as a JSON list")
    parser.add_argument("--repeat", type=int, default=1, help="child processes per row (median seconds)")
    parser.add_argument("--methods", default="gradcam,gradcampp,occlusion,integrated-gradients")
    parser.add_argument("--tools", default=None, help="only these tools' rows, comma-separated (default: every tool; "
                                                      "the method's reference row runs whenever another row does)")
    parser.add_argument("--one", nargs=4, metavar=("SIZE", "TOOL", "METHOD", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        size, tool, method, out = args.one
        print(json.dumps(run_one(size, tool, method, Path(out))))
        return

    tools = None if args.tools is None else set(args.tools.split(","))

    def rows(folder: Path) -> Iterator[dict]:
        for method in args.methods.split(","):
            tool = REFERENCES[method][0]
            reference = row(args.size, tool, method, folder, args.repeat if tool == "segxai" else 1)
            reference_map = folder / f"{REFERENCES[method][0]}-{method}.npy"
            for tool in [t for t, m in ROWS if m == method and (tools is None or t in tools)]:
                result = reference if (tool, method) == REFERENCES[method] else row(args.size, tool, method, folder,
                                                                                             args.repeat)
                agreement(result, folder / f"{tool}-{method}.npy", reference_map)
                yield result

    with tempfile.TemporaryDirectory() as folder:
        print_rows(rows(Path(folder)), args.json)


if __name__ == "__main__":
    main()
