"""Peak memory and time of `segxai segment` on a CT-sized scan (512x512x300) on this machine's CPU.

Target (issue 2): under 4 GB peak resident memory. Prints a table; run it with
``python benchmarks/ct_memory.py`` (takes a few minutes on 2 cores).

The weights are random: memory and time do not depend on what a network has learned, and no
CT model ships yet. The segmentation runs in a child process that reports its own peak resident
memory (``VmHWM``, see ``memory.py``) when the command has finished.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from SegXAILib.data.ct_phantom import ct_phantom
from SegXAILib.models.card import ModelCard
from SegXAILib.models.networks import build_network
from SegXAILib.volume import write_volume

CT_CARD = {
    "name": "ct-benchmark-unet",
    "architecture": {"name": "unet", "args": {"channels": [16, 32, 64, 128], "strides": [2, 2, 2]}},
    "input": {"channels": 1, "modality": "CT"},
    "classes": [{"name": "background", "label": 0}, {"name": "organ", "label": 1}, {"name": "lesion", "label": 2}],
    "preprocessing": {"orientation": "RAS", "spacing": [1.5, 1.5, 2.0],
                      "intensity": {"kind": "ct_window", "window": [-160, 240], "clip": True}},
    "patch_size": [96, 96, 96],
    "weights": "ct-benchmark-unet.safetensors",
}


def child_peak_rss_gb(arguments: list[str]) -> tuple[float, float]:
    """Run ``segxai ARGUMENTS`` in a child process; its peak RSS (GB) and wall seconds."""
    start = time.perf_counter()
    child = subprocess.run([sys.executable, __file__, "--child", *arguments], check=True,
                           capture_output=True, text=True)
    seconds = time.perf_counter() - start
    return float(child.stdout.strip().splitlines()[-1]), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", type=int, nargs=3, default=[300, 512, 512], metavar=("K", "J", "I"))
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        from memory import peak_rss_gb

        from SegXAILib.cli import main as segxai

        if segxai(args.child) != 0:
            raise SystemExit(1)
        print(peak_rss_gb())
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        image, _ = ct_phantom(shape=tuple(args.shape), spacing=(0.7, 0.7, 1.0))
        write_volume(image, tmp / "ct.nrrd")
        del image
        torch.manual_seed(0)
        network = build_network(CT_CARD["architecture"], 1, 3)
        save_file(network.state_dict(), str(tmp / CT_CARD["weights"]))
        ModelCard.from_dict(CT_CARD, root=tmp).save(tmp / "ct.json")
        peak, seconds = child_peak_rss_gb(["segment", str(tmp / "ct.nrrd"), "--model", str(tmp / "ct.json"),
                                           "--out", str(tmp / "out"), "--device", "cpu", "--progress", "none"])
        stages = json.loads((tmp / "out" / "summary.json").read_text(encoding="utf-8"))["seconds"]
    print("| scan | step | seconds | peak RSS (GB) |\n|---|---|---|---|")
    shape = "x".join(map(str, args.shape[::-1]))
    for stage, value in stages.items():
        print(f"| CT {shape} | {stage} | {value:.1f} | |")
    print(f"| CT {shape} | whole `segxai segment` process | {seconds:.1f} | {peak:.2f} |")


if __name__ == "__main__":
    main()
