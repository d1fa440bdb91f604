"""Why nnunetv2-cam's Grad-CAM of the held-out case is unrelated to SegXAI's: its target, measured.

nnunetv2-cam's ``SemanticSegmentationTarget`` sums *every* output channel over each window's lesion mask. This
script computes its map (``peer_adapters.nnunetv2_cam_gradcam``, as ``peers_nnunet.py`` does) three times, with
its target as published, with the lesion channel alone, and with the lesion's logit minus the background's (the
log-odds SegXAI explains, for two classes), and prints each map's Pearson correlation with SegXAI's default
Grad-CAM. Everything else (its windows, its per-window 0-1 scaling, its equal-weight averaging) stays its own.
Needs nnunetv2-cam, i.e. torchvision (docs/peers.md, "Where the rows ran").

    cd benchmarks && python nnunetv2_cam_target.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch


def main() -> None:
    import nnunetv2_cam.cam_core as core
    import peer_adapters
    from peers_nnunet import held_out_context, segxai_gradcam

    from SegXAILib.explain.gradcam import probe_input
    from SegXAILib.explain.layers import DEFAULT_LAYER, resolve_layers

    with tempfile.TemporaryDirectory() as folder:
        context, _ = held_out_context(Path(folder), torch.device("cpu"))
    ours = segxai_gradcam(context)
    layer = resolve_layers(context.model.network, DEFAULT_LAYER, probe_input(context))[0][0]
    published = core.SemanticSegmentationTarget

    class LesionChannel(published):
        def __call__(self, output: torch.Tensor) -> torch.Tensor:  # one example's (n_classes, D, H, W)
            return (output[self.category] * self.mask[0]).sum()

    class LesionLogOdds(published):
        def __call__(self, output: torch.Tensor) -> torch.Tensor:
            return ((output[self.category] - output[0]) * self.mask[0]).sum()

    for words, target in (("as published (every channel)", published), ("the lesion channel", LesionChannel),
                          ("lesion minus background logit", LesionLogOdds)):
        core.SemanticSegmentationTarget = target
        theirs = peer_adapters.nnunetv2_cam_gradcam(context.model.pipeline.predictor, context.image[0], layer)
        print(f"{words:32s} Pearson with SegXAI's map {peer_adapters.pearson(theirs, ours):.3f}")
    core.SemanticSegmentationTarget = published


if __name__ == "__main__":
    main()
