"""Sample T1 MRI volumes that ship with SegXAI's dependencies: nothing is ever downloaded.

* MNI152 (ICBM 2009a symmetric, 1 mm, skull-stripped) is bundled inside the ``nilearn`` wheel.
* Colin27 (ch2: a single subject scanned 27 times, 1 mm, with skull; ch2bet: skull-stripped;
  aal: the AAL atlas on the same grid) comes with Debian's ``mricron-data`` package.

These are *hosts* for synthetic lesions (see :mod:`SegXAILib.data.lesion`), not patients.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from pathlib import Path

from ..errors import SegXAIError
from ..volume import Volume, read_volume

MRICRON_TEMPLATES = Path("/usr/share/mricron/templates")
"""Where Debian's mricron-data installs its templates."""

_MNI152_T1 = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


def mni152_t1() -> Volume:
    """The MNI152 2009a T1 template bundled with nilearn, shape (189, 233, 197), 1 mm, uint8."""
    try:
        path = resources.files("nilearn") / "datasets" / "data" / _MNI152_T1
    except ModuleNotFoundError:
        raise SegXAIError("the MNI152 sample needs nilearn; install it (pip install nilearn)") from None
    if not path.is_file():
        raise SegXAIError(
            f"the MNI152 template {_MNI152_T1} is missing from the installed nilearn; "
            "reinstall nilearn (pip install --force-reinstall nilearn) or use --host colin27")
    with resources.as_file(path) as file:
        return read_volume(file)


def _colin27(name: str) -> Volume:
    path = MRICRON_TEMPLATES / name
    if not path.is_file():
        raise SegXAIError(
            f"Colin27 sample data not found at {path}; install Debian's mricron-data "
            "(sudo apt-get install mricron-data) or use --host mni152")
    return read_volume(path)


def colin27_t1() -> Volume:
    """Colin27 T1 with skull and scalp (``ch2.nii.gz``), shape (181, 217, 181), 1 mm, uint8."""
    return _colin27("ch2.nii.gz")


def colin27_brain() -> Volume:
    """Skull-stripped Colin27 T1 (``ch2bet.nii.gz``) on the grid of :func:`colin27_t1`; brain is > 0."""
    return _colin27("ch2bet.nii.gz")


def colin27_aal() -> Volume:
    """The AAL atlas (``aal.nii.gz``, labels 1..116, 0 = background) on the grid of :func:`colin27_t1`."""
    return _colin27("aal.nii.gz")


SAMPLE_HOSTS: dict[str, Callable[[], Volume]] = {
    "mni152": mni152_t1,
    "colin27": colin27_t1,
    "colin27-brain": colin27_brain,
}
"""Host T1 volumes for lesion synthesis, by the name given on the command line (``--host``)."""


def load_host(name: str) -> Volume:
    """Load the sample host T1 called ``name`` (a key of :data:`SAMPLE_HOSTS`)."""
    try:
        loader = SAMPLE_HOSTS[name]
    except KeyError:
        raise SegXAIError(
            f"unknown sample host {name!r}; use one of {', '.join(sorted(SAMPLE_HOSTS))}") from None
    return loader()


def default_demo_host() -> str:
    """Colin27 when mricron-data is installed (a single real subject, with skull), else MNI152."""
    return "colin27" if (MRICRON_TEMPLATES / "ch2.nii.gz").is_file() else "mni152"


def read_host(spec: str) -> Volume:
    """A host scan: a sample name (a key of :data:`SAMPLE_HOSTS`) or a path to a scan file."""
    return load_host(spec) if spec in SAMPLE_HOSTS else read_volume(spec)
