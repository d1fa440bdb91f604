"""How exactly SegXAI segments the four Model Zoo bundle forms against MONAI's own evaluator.

For each test bundle of ``SegXAILib/tests/test_bundle_pipeline.py`` (random weights balanced so that every class
appears), the share of voxels whose label equals the one ``monai.bundle.run`` saves: with the scan read by the
bundle's ``LoadImaged`` (SegXAI's path for a file MONAI can read) and handed over as SegXAI read it (its path for
a scan MONAI cannot read, or one with no file). Run: ``python benchmarks/bundle_forms.py``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from SegXAILib.inference import segment
from SegXAILib.models import registry
from SegXAILib.tests.test_bundle_pipeline import (
    BRATS,
    FORMS,
    brats_labels,
    monai_labels,
    phantom_ct,
    write_sequences,
    zoo_bundle,
)
from SegXAILib.volume import Volume, read_volume, write_volume


def in_memory(volume: Volume) -> Volume:
    """The same voxels and geometry with no file behind them."""
    return Volume(volume.array, volume.spacing, volume.origin, volume.direction)


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bundle-forms-"))
    scan_file = write_volume(phantom_ct(), tmp / "case.nii.gz")
    sequence_files = write_sequences(tmp / "sequences")
    print(f"{'form':12s} {'classes':>7s} {'read by LoadImaged':>19s} {'handed over':>12s}")
    for name, form in {**FORMS, "brats": BRATS}.items():
        files = sequence_files if name == "brats" else [scan_file]
        folder = zoo_bundle(tmp / name, form, files if name == "brats" else scan_file)
        model = registry.load_model(folder, trust_model_code=name in ("whole_body", "brats"))
        scans = [read_volume(f) for f in files]
        read = segment(scans, model, "cpu").labels.array
        handed = segment([in_memory(s) for s in scans], model, "cpu").labels.array
        expected = (brats_labels(folder, files, tmp / f"monai-{name}") if name == "brats"
                    else monai_labels(folder, scan_file, tmp / f"monai-{name}"))
        print(f"{name:12s} {len(np.unique(expected)):7d} {np.mean(read == expected):19.6f} "
              f"{np.mean(handed == expected):12.6f}")


if __name__ == "__main__":
    main()
