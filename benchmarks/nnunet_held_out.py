"""The bundled nnU-Net (``nnunet-lesion-tiny``) on the held-out case of ``SegXAILib/tests/test_nnunet.py``: lesion
voxels found and true, and their Dice (the figures in docs/nnunet.md and the model's ``segxai.json``).
Run: ``python benchmarks/nnunet_held_out.py`` (needs the ``nnunet`` extra)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from SegXAILib.inference import segment
from SegXAILib.metrics import dice
from SegXAILib.models import registry
from SegXAILib.tests.test_nnunet import held_out_case
from SegXAILib.volume import read_volume


def main() -> None:
    scan_file, truth = held_out_case(Path(tempfile.mkdtemp(prefix="nnunet-held-out-")))
    found = segment(read_volume(scan_file), registry.load_model("nnunet-lesion-tiny"), "cpu").labels.array > 0
    print(f"lesion voxels found {int(found.sum())}, true {int(truth.sum())}, Dice {dice(found, truth):.3f}")


if __name__ == "__main__":
    main()
