"""Hostile input: a short, corrupt or impossible scan file and an impossible model card each end in one
``error:`` line that names the problem and the fix, before anything is written or allocated.

ITK on its own reads a truncated int16 .nii.gz with the missing voxels as zeros (exit 0), a zero NIfTI voxel
size as 1 mm and a negative one as a mirrored axis, and writes a sheared grid back rotated.
"""

from __future__ import annotations

import gzip
import json
import math
import re
import struct
from pathlib import Path

import nibabel
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from SegXAILib.cli import main
from SegXAILib.errors import SegXAIError
from SegXAILib.models.card import ModelCard, stride_multiple
from SegXAILib.preprocessing import check_model_grid_memory, segmentation_bytes
from SegXAILib.volume import Volume, read_volume, write_volume

from .conftest import TINY_ARCH, make_card, oblique_scan

# ------------------------------------------------------------------------------------ hostile files
PIXDIM_1 = 80  # byte offset of pixdim[1] (the voxel size along I) in a NIfTI-1 header


def scan(folder: Path, suffix: str, dtype=np.float32, compress: bool = True, name: str = "scan") -> Path:
    volume = oblique_scan()
    return write_volume(volume.with_array((volume.array * 10).astype(dtype)), folder / f"{name}{suffix}",
                        compress=compress)


def truncated(path: Path, keep: float = 2 / 3) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def edited(path: Path, pattern: bytes, replacement: bytes) -> Path:
    data, count = re.subn(pattern, replacement, path.read_bytes(), count=1)
    assert count == 1, pattern
    path.write_bytes(data)
    return path


def with_pixdim(folder: Path, value: float) -> Path:
    path = scan(folder, ".nii", compress=False)
    data = bytearray(path.read_bytes())
    data[PIXDIM_1:PIXDIM_1 + 4] = struct.pack("<f", value)
    path.write_bytes(bytes(data))
    return path


def with_bad_crc(folder: Path) -> Path:
    path = scan(folder, ".nii.gz")
    data = bytearray(path.read_bytes())
    data[-6] ^= 0xFF  # inside the CRC-32 of the gzip trailer
    path.write_bytes(bytes(data))
    return path


def with_garbage_tail(folder: Path) -> Path:
    path = scan(folder, ".nii.gz")
    path.write_bytes(path.read_bytes() + b"this is not part of the image")
    return path


def sheared(folder: Path, suffix: str) -> Path:
    path = write_volume(Volume(oblique_scan().array), folder / f"scan{suffix}", compress=False)
    if suffix == ".mha":
        return edited(path, rb"TransformMatrix = [^\n]*", b"TransformMatrix = -1 0 0 0.5 -1 0 0 0 1")
    return edited(path, rb"space directions: [^\n]*", b"space directions: (-1,0,0) (0.5,-1,0) (0,0,1)")


SCAN_ROWS = {
    "truncated int16 nii.gz": (lambda d: truncated(scan(d, ".nii.gz", np.int16)), "the file is truncated"),
    "truncated float32 nii.gz": (lambda d: truncated(scan(d, ".nii.gz")), "the file is truncated"),
    "truncated raw nii": (lambda d: truncated(scan(d, ".nii", compress=False)), "the file is truncated"),
    "truncated raw nrrd": (lambda d: truncated(scan(d, ".nrrd", compress=False)), "the file is truncated"),
    "truncated gzip nrrd": (lambda d: truncated(scan(d, ".nrrd")), "the file is truncated"),
    "truncated raw mha": (lambda d: truncated(scan(d, ".mha", compress=False)), "the file is truncated"),
    "truncated compressed mha": (lambda d: truncated(scan(d, ".mha")), "the file is truncated"),
    "truncated gzip trailer": (lambda d: truncated(scan(d, ".nii.gz"), keep=1.0 - 1e-9), "before its end marker"),
    "gzip with a corrupt CRC": (with_bad_crc, "is corrupt: its compressed data fails to decompress"),
    "gzip with a garbage tail": (with_garbage_tail, "foreign data follows its compressed stream"),
    "zero NIfTI pixdim": (lambda d: with_pixdim(d, 0.0), "a voxel size must be a positive number"),
    "negative NIfTI pixdim": (lambda d: with_pixdim(d, -1.1), "a voxel size must be a positive number"),
    "sheared mha": (lambda d: sheared(d, ".mha"), "is not orthonormal"),
    "sheared nrrd": (lambda d: sheared(d, ".nrrd"), "is not orthonormal"),
}


# ------------------------------------------------------------------------------------ hostile cards
def set_in(path: str, value):
    """An edit of a card dictionary: ``path`` is a dotted key path (list indices as numbers)."""
    def edit(card: dict) -> None:
        *parents, last = path.split(".")
        node = card
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[int(last) if isinstance(node, list) else last] = value
    return edit


CARD_ROWS = {
    "NaN spacing": (set_in("preprocessing.spacing", [math.nan, 2.0, 2.0]), "spacing must be three positive numbers"),
    "zero spacing": (set_in("preprocessing.spacing", [2.0, 0.0, 2.0]), "spacing must be three positive numbers"),
    "window low >= high": (set_in("preprocessing.intensity", {"kind": "ct_window", "window": [100, 100]}),
                           "with low < high"),
    "percentile 150": (set_in("preprocessing.intensity", {"kind": "percentile", "lower": 1, "upper": 150}),
                       "percentiles from 0 to 100"),
    "label 70000": (set_in("classes.2.label", 70000), "labels must be integers from 0 to 65535"),
    "duplicate labels": (set_in("classes.2.label", 1), "classes need distinct labels: [1]"),
    "patch 4": (set_in("patch_size", [4, 4, 4]), "patch_size must be three integers from 8 to 512"),
    "patch 1000": (set_in("patch_size", [1000, 1000, 1000]), "patch_size must be three integers from 8 to 512"),
    "patch not divisible": (set_in("patch_size", [18, 16, 16]), "is not divisible by [4, 4, 4]"),
    "input channels 0": (set_in("input.channels", 0), "input.channels must be an integer from 1 to 16"),
    "input channels 40": (set_in("input.channels", 40), "input.channels must be an integer from 1 to 16"),
    "invalid orientation": (set_in("preprocessing.orientation", "XYZ"), "orientation 'XYZ' is not supported"),
    "spacing too fine for memory": (set_in("preprocessing.spacing", [1e-3, 1e-3, 1e-3]), "is too fine for this scan"),
}


@pytest.mark.parametrize("row", [*SCAN_ROWS, *CARD_ROWS])
def test_hostile_input_is_one_error_line_and_writes_nothing(row, tmp_path, tiny_card, capfd):
    if row in SCAN_ROWS:
        build, phrase = SCAN_ROWS[row]
        (tmp_path / "in").mkdir()
        scan_path, card_path = build(tmp_path / "in"), tiny_card
    else:
        edit, phrase = CARD_ROWS[row]
        scan_path = scan(tmp_path, ".nii.gz")
        card = json.loads(tiny_card.read_text(encoding="utf-8"))
        edit(card)
        tiny_card.write_text(json.dumps(card), encoding="utf-8")  # NaN is written as the literal NaN
        card_path = tiny_card
    capfd.readouterr()
    out = tmp_path / "out"
    code = main(["segment", str(scan_path), "--model", str(card_path), "--out", str(out), "--progress", "none"])
    stderr = capfd.readouterr().err  # at the file descriptor: ITK's own warnings would show here too
    assert code == 2, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert phrase in lines[0], lines[0]
    if row != "spacing too fine for memory":  # that one is about the scan and the card together
        assert (scan_path.name if row in SCAN_ROWS else card_path.name) in lines[0]  # the message names the file
    assert not out.exists()


# ------------------------------------------------------------------------------------ issue 2's bad inputs
def _write(folder: Path, name: str, array: np.ndarray) -> Path:
    return write_volume(Volume(array), folder / name)


def _four_d(folder: Path) -> Path:
    import SimpleITK as sitk

    image = sitk.JoinSeries([sitk.GetImageFromArray(np.random.rand(5, 6, 7).astype(np.float32))] * 3)
    sitk.WriteImage(image, str(folder / "series.nii.gz"))
    return folder / "series.nii.gz"


def _nan(folder: Path) -> Path:
    array = oblique_scan().array.copy()
    array[3, 4, 5] = np.nan
    return _write(folder, "nan.nii.gz", array)


EARLIER_ROWS = {  # each builds (scan, model) from (folder, tiny card), and the phrase of its one line
    "missing file": (lambda d, c: (d / "nope.nii.gz", c), "file not found"),
    "not an image": (lambda d, c: ((d / "notes.nii.gz").write_bytes(b"hello") and d / "notes.nii.gz", c),
                     "notes.nii.gz"),
    "2D input": (lambda d, c: (_write(d, "slice.nii.gz", np.random.rand(1, 9, 9).astype(np.float32)), c),
                 "single slice"),
    "4D input": (lambda d, c: (_four_d(d), c), "4D"),
    "NaN voxels": (lambda d, c: (_nan(d), c), "NaN or infinite"),
    "constant volume": (lambda d, c: (_write(d, "flat.nrrd", np.full((6, 7, 8), 5, np.int16)), c), "empty"),
    "unknown model": (lambda d, c: (scan(d, ".nii.gz"), "no-such-model"), "unknown model 'no-such-model'"),
    "input channels mismatch": (lambda d, c: (scan(d, ".nii.gz"), make_card(c.parent, "two", input_channels=2)),
                                "takes 2 scan(s), in this order: sequence 1, sequence 2; 1 given"),
    "weights of another architecture": (
        lambda d, c: (scan(d, ".nii.gz"), make_card(c.parent, "other", weights_from={
            "name": "unet", "args": {"channels": [2, 4, 8], "strides": [2, 2]}})), "weights"),
}


@pytest.mark.parametrize("row", EARLIER_ROWS)
def test_issue_2s_bad_inputs_are_one_error_line_and_write_nothing(row, tmp_path, tiny_card, capfd):
    build, phrase = EARLIER_ROWS[row]
    (tmp_path / "in").mkdir()
    scan_path, model = build(tmp_path / "in", tiny_card)
    before = scan_path.read_bytes() if scan_path.is_file() else None
    capfd.readouterr()
    out = tmp_path / "out"
    code = main(["segment", str(scan_path), "--model", str(model), "--out", str(out), "--progress", "none"])
    lines = capfd.readouterr().err.splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and phrase in lines[0], lines
    assert not out.exists()
    assert before is None or scan_path.read_bytes() == before  # the input is never modified


def test_an_unknown_class_is_one_error_line(tmp_path, tiny_card, capfd):
    out = tmp_path / "out"
    code = main(["explain", str(scan(tmp_path, ".nii.gz")), "--model", str(tiny_card), "--target", "tumor",
                 "--out", str(out), "--progress", "none"])
    lines = capfd.readouterr().err.splitlines()
    assert code == 2 and len(lines) == 1 and "unknown class 'tumor'" in lines[0], lines
    assert "did you mean" not in lines[0]  # nothing of this card's is close to 'tumor'
    code = main(["explain", str(scan(tmp_path, ".nii.gz")), "--model", str(tiny_card), "--target", "lesoin",
                 "--out", str(out), "--progress", "none"])
    lines = capfd.readouterr().err.splitlines()
    assert code == 2 and len(lines) == 1 and "did you mean 'lesion'?" in lines[0], lines
    assert not out.exists()


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == "segxai 0.1.0"


# ------------------------------------------------------------------------------------ normal variants read exactly
def test_variants_of_valid_files_read_exactly(tmp_path):
    expected = (oblique_scan().array * 10).astype(np.int16)
    # a multi-member gzip file (as concatenated or parallel gzip writers make it)
    plain = scan(tmp_path, ".nii", np.int16, compress=False).read_bytes()
    (tmp_path / "members.nii.gz").write_bytes(gzip.compress(plain[:1000]) + gzip.compress(plain[1000:]))
    # an uncompressed file under a .nii.gz name, which ITK reads too
    (tmp_path / "plain.nii.gz").write_bytes(plain)
    # zero bytes after the stream (padding some transfers add)
    (tmp_path / "padded.nii.gz").write_bytes(gzip.compress(plain) + bytes(64))
    for name in ("members.nii.gz", "plain.nii.gz", "padded.nii.gz"):
        np.testing.assert_array_equal(read_volume(tmp_path / name).array, expected)


def test_float_nifti_keeps_its_non_finite_voxels(tmp_path):
    # ITK reads NaN and inf as 0; the voxels are read as the file holds them, so validate_scan can refuse them
    volume = oblique_scan()
    array = volume.array.copy()
    array[1, 2, 3], array[4, 5, 6] = np.nan, -np.inf
    for suffix in (".nii.gz", ".nii"):
        back = read_volume(write_volume(volume.with_array(array), tmp_path / f"nan{suffix}"))
        np.testing.assert_array_equal(back.array, array)


def test_detached_data_that_is_missing_or_short_is_named(tmp_path):
    header = write_volume(oblique_scan(), tmp_path / "scan.mhd", compress=False)
    data = tmp_path / "scan.raw"
    truncated(data)
    with pytest.raises(SegXAIError, match=r"scan\.raw \(the voxel data of .*scan\.mhd\) holds .* is truncated"):
        read_volume(header)
    data.unlink()
    with pytest.raises(SegXAIError, match=r"keeps its voxels in .*scan\.raw, which is missing"):
        read_volume(header)


# ------------------------------------------------------------------------------------ memory
def test_memory_estimate_refuses_a_grid_that_does_not_fit_and_accepts_one_that_does():
    volume = Volume(np.zeros((10, 20, 30), np.float32), spacing=(1.0, 1.0, 2.0))  # 30 x 20 x 20 mm
    voxels = 30 * 20 * 20
    assert segmentation_bytes(voxels, 3) == 4 * voxels * 13
    check_model_grid_memory(volume, (1.0, 1.0, 1.0), 3, available=segmentation_bytes(voxels, 3))
    with pytest.raises(SegXAIError, match=r"would be 30x20x20 voxels .* spacing 1 x 1 x 1 mm is too fine for this "
                                          r"scan of 30 x 20 x 20 mm"):
        check_model_grid_memory(volume, (1.0, 1.0, 1.0), 3, available=segmentation_bytes(voxels, 3) - 1)
    # a grid smaller than a window is padded to the window
    with pytest.raises(SegXAIError, match="would be 64x64x64 voxels"):
        check_model_grid_memory(volume, (1.0, 1.0, 1.0), 3, patch_size=(64, 64, 64), available=10**6)


def test_memory_estimate_of_an_absurd_spacing_is_immediate():
    # 10^-6 mm on a 256 mm head: 10^26 voxels, estimated, never allocated
    with pytest.raises(SegXAIError, match="PB to segment"):
        check_model_grid_memory(Volume(np.zeros((2, 2, 2)), spacing=(128.0,) * 3), (1e-6,) * 3)


# ------------------------------------------------------------------------------------ the network's multiple
def test_card_divisibility_rule_is_the_networks():
    from SegXAILib.models.networks import input_multiple
    from SegXAILib.models.registry import available_cards, card_at

    cards = [card_at(path) for path in available_cards().values()]  # cards, and model folders (nnU-Net's)
    cards.append(ModelCard.from_dict(card_dict()))
    for card in cards:
        rule = stride_multiple(card.architecture)
        assert input_multiple(card) == (rule if rule is not None else input_multiple(card)), card.name


# ------------------------------------------------------------------------------------ fuzzing: NIfTI
NIFTI_DTYPES = [np.uint8, np.int8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.float32, np.float64]
NIFTI_CODES = [2, 4, 8, 16, 64, 256, 512, 768, 1024, 1280, 32, 128, 0, 3, 9999]  # the last three are no type


@settings(derandomize=True, max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=st.tuples(*[st.integers(1, 6)] * 3), dtype=st.sampled_from(NIFTI_DTYPES),
       big_endian=st.booleans(), compressed=st.booleans(),
       dims=st.none() | st.tuples(*[st.integers(-2, 12)] * 3), code=st.none() | st.sampled_from(NIFTI_CODES),
       cut=st.none() | st.floats(0.0, 1.0, exclude_max=True))
def test_fuzzed_nifti_reads_correctly_or_fails_with_one_error(tmp_path, shape, dtype, big_endian, compressed, dims,
                                                              code, cut):
    order = ">" if big_endian else "<"
    data = (np.arange(np.prod(shape)).reshape(shape) % 97 + 1).astype(np.dtype(dtype).newbyteorder(order))
    image = nibabel.Nifti1Image(data, np.diag([1.5, 2.0, 2.5, 1.0]), nibabel.Nifti1Header(endianness=order))
    raw = bytearray(image.to_bytes())
    if dims is not None:  # dim[1..3] at byte 42
        raw[42:48] = struct.pack(f"{order}3h", *dims)
    if code is not None:  # datatype at byte 70, bitpix at 72
        raw[70:72] = struct.pack(f"{order}h", code)
    content = gzip.compress(bytes(raw)) if compressed else bytes(raw)
    if cut is not None:
        content = content[: int(len(content) * cut)]
    path = tmp_path / ("fuzz.nii.gz" if compressed else "fuzz.nii")
    path.write_bytes(content)
    try:
        oracle = np.asarray(nibabel.load(path).dataobj)  # nibabel, an independent reader
    except Exception:  # noqa: BLE001 - nibabel's many ways of refusing a file
        oracle = None
    try:
        volume = read_volume(path)
    except SegXAIError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc)
        assert cut is not None or dims is not None or code is not None or oracle is None, exc
        event(f"refused: {re.sub(r'[0-9,]+', 'N', str(exc).split(': ', 1)[-1])[:60]}")
        return
    event("read")
    assert cut is None, "a truncated file was read"
    assert oracle is not None, "read a file that nibabel finds short or invalid"
    np.testing.assert_array_equal(volume.array, oracle.T)  # never zero-filled


# ------------------------------------------------------------------------------------ fuzzing: card numbers
def card_dict(**changes) -> dict:
    card = {"name": "fuzz", "architecture": TINY_ARCH, "input": {"channels": 1, "modality": "MRI"},
            "classes": [{"name": "background", "label": 0}, {"name": "core", "label": 1},
                        {"name": "rim", "label": 4}],
            "preprocessing": {"orientation": "RAS", "spacing": [2.0, 2.0, 2.0],
                              "intensity": {"kind": "zscore_foreground"}},
            "patch_size": [16, 16, 16]}
    card.update(changes)
    return card


HOSTILE = (st.floats(allow_nan=True, allow_infinity=True) | st.integers(-10**20, 10**20)
           | st.sampled_from([0, -1, 7, 513, 65536, 1e300, -0.0, 2.5, math.nan, math.inf, -math.inf]))


def mostly(valid: st.SearchStrategy) -> st.SearchStrategy:
    """``valid`` three times in four, a hostile number otherwise: examples load as often as they fail."""
    return st.integers(0, 3).flatmap(lambda n: valid if n else HOSTILE)


@settings(derandomize=True, max_examples=40, deadline=None)
@given(spacing=st.lists(mostly(st.floats(0.1, 10.0)), min_size=3, max_size=3),
       window=st.lists(mostly(st.floats(-2000.0, 4000.0)), min_size=2, max_size=2),
       lower=mostly(st.floats(0.0, 100.0)), upper=mostly(st.floats(0.0, 100.0)),
       label=mostly(st.integers(1, 65535)), patch=mostly(st.sampled_from([8, 16, 96, 512])),
       channels=mostly(st.integers(1, 16)), kind=st.sampled_from(["ct_window", "percentile", "zscore_foreground"]))
def test_fuzzed_card_numbers_load_valid_or_fail_with_one_error(spacing, window, lower, upper, label, patch, channels,
                                                               kind):
    intensity = {"kind": kind, "window": window, "lower": lower, "upper": upper}
    data = card_dict(preprocessing={"spacing": spacing, "intensity": intensity}, patch_size=[patch, 16, 32],
                     input={"channels": channels},
                     classes=[{"name": "background", "label": 0}, {"name": "lesion", "label": label}])
    data = json.loads(json.dumps(data))  # as a card file holds them
    try:
        card = ModelCard.from_dict(data)
    except SegXAIError as exc:
        assert "\n" not in str(exc)
        event(f"refused: {str(exc)[7:40]}")
        return
    event("loaded")
    assert all(math.isfinite(s) and s > 0 for s in card.preprocessing["spacing"])
    assert all(isinstance(p, int) and 8 <= p <= 512 and p % 4 == 0 for p in card.patch_size)
    assert isinstance(card.input_channels, int) and 1 <= card.input_channels <= 16
    assert all(isinstance(c.label, int) and 0 <= c.label <= 65535 for c in card.classes)
    assert len({c.label for c in card.classes}) == 2
    if kind == "ct_window":
        assert all(math.isfinite(w) for w in window) and window[0] < window[1]
    if kind == "percentile":
        assert 0 <= lower < upper <= 100
