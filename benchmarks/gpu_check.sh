#!/usr/bin/env bash
# The GPU path, in one run on a machine with an NVIDIA GPU (issue 24, item 4): the CUDA tests, then the methods'
# cost against one forward pass at 128^3 and on the CT grid, on the GPU. Figures go to docs/benchmarks.md with
# the card named. Run from the repository root with the set-up's .venv active: bash benchmarks/gpu_check.sh
set -euo pipefail
nvidia-smi --query-gpu=name,memory.total --format=csv
pytest -q -m cuda SegXAILib/tests/test_cuda.py
SEGXAI_BENCH_DEVICE=cuda python benchmarks/explainers.py --sizes 128,ct \
    --methods gradcam,gradcampp,protoseg,tta,mcdropout,occlusion,integrated-gradients
# nnU-Net: SegXAI's Grad-CAM beside nnunetv2-cam's (docs/peers.md). nnunetv2-cam needs grad-cam, which imports
# torchvision: it imports beside the CUDA torch (install first: pip install grad-cam nnunetv2-cam); elsewhere its
# row says why it fails
python benchmarks/peers_nnunet.py --repeat 3
