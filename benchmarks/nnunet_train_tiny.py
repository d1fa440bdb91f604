"""Train nnU-Net's own trainer (``nnUNetTrainer``) for a few epochs on CPU: the small nnU-Net model SegXAI's
tests explain (SegXAILib/models/weights/nnunet-lesion-tiny; all commands in docs/nnunet.md).

Why not ``nnUNetv2_train -tr nnUNetTrainer_1epoch``: that command finds a trainer by importing every
trainer module nnU-Net ships, the Primus ones among them, which import timm and so torchvision; PyPI's
torchvision is built for CUDA torch and fails to import beside a CPU torch. nnU-Net's ``nnUNetTrainer_Xepochs``
variants only set ``num_epochs``; this script does the same on the base trainer, so the checkpoint names
``nnUNetTrainer`` (which ``nnUNetv2_predict`` finds without importing Primus) and the training is
nnU-Net's own (run_training's steps: build the trainer, train, validate the fold).

    nnUNet_raw=... nnUNet_preprocessed=... nnUNet_results=... \\
        python benchmarks/nnunet_train_tiny.py 901 --plans nnUNetPlans_tiny --epochs 2
"""
from __future__ import annotations

import argparse

import torch
from nnunetv2.run.run_training import get_trainer_from_args


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", help="nnU-Net dataset id or name, e.g. 901")
    parser.add_argument("--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    parser.add_argument("--configuration", default="3d_fullres")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=1, help="epochs of 250 iterations each (default 1)")
    parser.add_argument("--iterations", type=int, default=None,
                        help="training iterations per epoch (nnU-Net's num_iterations_per_epoch; default its 250): "
                             "fewer where an epoch would take too long on a CPU")
    args = parser.parse_args()
    trainer = get_trainer_from_args(args.dataset, args.configuration, args.fold, "nnUNetTrainer", args.plans,
                                    device=torch.device("cpu"))
    trainer.num_epochs = args.epochs
    if args.iterations is not None:
        trainer.num_iterations_per_epoch = args.iterations
    trainer.run_training()
    trainer.perform_actual_validation(False)


if __name__ == "__main__":
    main()
