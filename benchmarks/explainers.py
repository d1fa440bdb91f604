"""Seconds and peak memory of every explanation method, and their ratio to one forward pass.

Each (scan size, method) runs in a fresh child process that first times one sliding-window
forward pass, then the method, on the same input: the ratio is measured in one run, on one
machine state. Peak memory is the child's own peak resident set (``VmHWM``, see ``memory.py``).

Sizes: 96^3 and 128^3 (the model grid of a brain MRI) and a CT-sized scan of 512x512x120 on its
own grid (sliding windows). The network is the bundled brain-lesion model's architecture; for
timing, weights do not matter, but the bundled ones are used when present. Attention maps need an
Attention U-Net, which no bundled model is: that row runs one with random weights.

Targets on CPU (issues 3, 5 and 7): Grad-CAM <= 3x, ProtoSeg <= 2x, TTA (8) <= 9x, MHEX+ CAM <= 1.2x,
collaboration uncertainty <= 10x, MiSuRe < 60x a forward pass; every method under 4 GB on the
CT-sized scan. The fusion maps of the dual encoder have no target (the issue asks for the row).

    python benchmarks/explainers.py                  # the whole table (slow on 2 cores)
    python benchmarks/explainers.py --sizes 96 --methods gradcam,protoseg
    python benchmarks/explainers.py --sizes 128 --methods mhex-uncertainty --option mhex-uncertainty.k=64
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

SIZES = {"96": (96, 96, 96), "128": (128, 128, 128), "ct": (120, 512, 512)}
TARGETS = {"gradcam": 3.0, "gradcampp": 3.0, "protoseg": 2.0, "tta": 9.0, "mhex": 1.2, "mhex-uncertainty": 10.0,
           "misure": 60.0}


MODELS = {"mhex": "brain-lesion-eunet", "mhex-uncertainty": "brain-lesion-eunet", "fusion": "brain-lesion-dual-encoder",
          "attention": "attention_unet, random weights"}
"""Methods that need a particular architecture (the model the table names); the others run on the U-Net ensemble."""

UNBUNDLED = {"attention": {"name": "attention_unet", "args": {"channels": [16, 32, 64, 128], "strides": [2, 2, 2]}}}
"""Methods whose architecture no bundled model has: the U-Net's card with this architecture and
random weights (seconds and memory do not depend on the weights)."""


def model_for(method: str):
    """The bundled model a method runs on (EU-Net for MHEX+, dual encoder for fusion), loaded on the CPU."""
    from SegXAILib.models.registry import available_cards, load_model, resolve_card

    if method in UNBUNDLED:
        from dataclasses import replace

        from SegXAILib.models.loaders import LoadedModel
        from SegXAILib.models.networks import build_network

        card = replace(resolve_card("brain-lesion-unet"), architecture=UNBUNDLED[method])
        return LoadedModel(card, build_network(card.architecture, card.input_channels, card.n_classes).eval(), "card")
    wanted = MODELS.get(method, "brain-lesion-unet")
    if wanted not in available_cards():
        raise SystemExit(f"model {wanted} is not installed")
    return load_model(wanted)


def synthetic_scan(shape: tuple[int, ...]):
    """The benchmarks' scan: a bright ball (value 2, radius about a third of the grid) in noise of sd 0.3, float32
    of ``shape`` (D, H, W); the bundled U-Net segments the ball as tumour."""
    import numpy as np

    k, j, i = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in shape], indexing="ij")
    noise = np.random.default_rng(0).normal(0, 0.3, shape)
    return (np.where(k**2 + j**2 + i**2 < 0.1, 2.0, 0.0) + noise).astype(np.float32)


def run_one(size: str, method: str, options: list[str]) -> dict:
    """In this process: time a forward pass, then the method; report seconds and peak RSS."""
    import torch
    from memory import peak_rss_gb

    from SegXAILib.explain.base import ExplainContext
    from SegXAILib.inference import predict_probabilities
    from SegXAILib.methods import get_explainer, parse_option_pairs

    torch.manual_seed(0)
    model = model_for(method)
    image = synthetic_scan(SIZES[size])
    device = torch.device(os.environ.get("SEGXAI_BENCH_DEVICE", "cpu"))  # benchmarks/gpu_check.sh sets cuda
    start = time.perf_counter()
    probabilities = predict_probabilities(model, image, device)
    forward = time.perf_counter() - start
    _, channels = model.card.target_channels(None)
    context = ExplainContext(model=model, image=torch.from_numpy(image)[None, None], target="target",
                             channels=channels, probabilities=probabilities, device=device,
                             options=parse_option_pairs(options))
    explainer = get_explainer(method)
    explainer.check_applicable(model)
    start = time.perf_counter()
    explainer.explain(context)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = peak_rss_gb()
    gpu = {"gpu_peak_gb": torch.cuda.max_memory_allocated() / 2**30} if device.type == "cuda" else {}
    return {"size": size, "method": method, "forward": forward, "seconds": seconds, "peak_gb": peak, **gpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="96,128,ct")
    parser.add_argument("--methods", default="gradcam,gradcampp,protoseg,attention,mcdropout,tta,ensemble,mhex,"
                                             "mhex-uncertainty,fusion,misure")
    parser.add_argument("--option", action="append", default=[], metavar="METHOD.NAME=VALUE",
                        help="method option, as for segxai explain (repeatable)")
    parser.add_argument("--one", nargs=2, metavar=("SIZE", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(*args.one, args.option)))
        return
    print("| scan | method | model | forward (s) | method (s) | ratio | target | peak RSS (GB) |")
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        for method in args.methods.split(","):
            options = [arg for option in args.option for arg in ("--option", option)]
            child = subprocess.run([sys.executable, __file__, "--one", size, method, *options],
                                   capture_output=True, text=True)
            if child.returncode != 0:
                reason = (child.stderr.strip().splitlines() or ["failed"])[-1][:80]
                print(f"| {'x'.join(map(str, SIZES[size][::-1]))} | {method} | | | | | | {reason} |")
                continue
            row = json.loads(child.stdout.strip().splitlines()[-1])
            target = TARGETS.get(method)
            print(f"| {'x'.join(map(str, SIZES[size][::-1]))} | {method} | {MODELS.get(method, 'brain-lesion-unet')} | "
                  f"{row['forward']:.1f} | {row['seconds']:.1f} | "
                  f"{row['seconds'] / row['forward']:.2f}x | {f'<= {target}x' if target else ''} | "
                  f"{row['peak_gb']:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
