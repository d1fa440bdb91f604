"""The tensors of a TorchScript archive, read without running any of its code.

A TorchScript file (``torch.jit.save``) is a zip: ``<name>/code/`` holds the model's TorchScript source,
``<name>/data.pkl`` a pickle of the module tree whose tensors point at raw storages in ``<name>/data/<key>``,
``<name>/constants.pkl`` the code's tensor constants. ``torch.jit.load`` compiles that code and runs it while
loading: a module's ``__setstate__`` is called on its pickled state and can do whatever TorchScript can (write a
file, for one: the tests' archive does). So SegXAI opens an archive with ``torch.jit.load`` only for a user who
said they trust it (:mod:`SegXAILib.models.trust`).

What is read here instead is the pickle of the module tree, by a restricted unpickler that builds no object of the
archive's classes and calls nothing but the rebuilding of a tensor from its storage: each ``__torch__`` class
becomes an inert record of its pickled state, any other global than a tensor, a storage type or an
``OrderedDict`` stops the reading. Parameters and buffers then come out under their module paths
(``down0.block1.double_conv.0.weight``), the names ``module.state_dict()`` gives, so an eager network of the same
architecture loads them (:func:`SegXAILib.models.loaders.read_state_dict`): the archive's network, with hooks
(Grad-CAM and the other layer methods), without its code.
"""

from __future__ import annotations

import pickle
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from ..errors import SegXAIError

STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
"""The storage types a tensor of the archive may have, and their dtypes."""


def _records(path: Path) -> list[str] | None:
    """The names in ``path`` when it is a zip file, else None."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return None


def _prefix(names: list[str]) -> str | None:
    """The archive's top folder (``name/``) when it holds TorchScript (``constants.pkl`` or ``code/``), else None."""
    for name in names:
        top, _, rest = name.partition("/")
        if rest == "constants.pkl" or rest.startswith("code/"):
            return top + "/"
    return None


def is_torchscript_archive(path: str | Path) -> bool:
    """``path`` is a TorchScript archive (``torch.jit.save``); only the zip's table of contents is read."""
    names = _records(Path(path))
    return names is not None and _prefix(names) is not None


class ScriptObject:
    """An object of one of the archive's TorchScript classes, as pickled: its class name and its state (a dict of
    attributes for a module, or whatever its ``__getstate__`` returned). Nothing of the class runs."""

    qualified_name = "__torch__"

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _script_class(qualified_name: str) -> type:
    return type("ScriptObject", (ScriptObject,), {"qualified_name": qualified_name})


class _Storage:
    """A storage type named in a persistent id (``torch FloatStorage``): only its dtype is used."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.dtype = STORAGE_DTYPES[name]


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: tuple, stride: tuple, requires_grad: bool = False,
                    hooks: Any = None, *metadata: Any) -> torch.Tensor:
    """``torch._utils._rebuild_tensor_v2`` on our own storage; ``as_strided`` checks the bounds."""
    if hooks:
        raise pickle.UnpicklingError("a tensor with backward hooks")
    return storage.as_strided(tuple(size), tuple(stride), int(offset))


_TYPE_TAGS = {name: (lambda value, *_: value) for name in (
    "build_intlist", "build_tensorlist", "build_doublelist", "build_boollist", "restore_type_tag")}
"""``torch.jit._pickle``'s helpers, which tag a list with its element type: each returns its value (ours, not
torch's functions, which do the same)."""


class _ArchiveUnpickler(pickle.Unpickler):
    """Builds records, tensors and ordered dicts only; see the module docstring."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(file)
        self.archive = archive
        self.prefix = prefix
        self.storages: dict[str, torch.Tensor] = {}
        self.classes: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            return self.classes.setdefault(f"{module}.{name}", _script_class(f"{module}.{name}"))
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch.jit._pickle" and name in _TYPE_TAGS:
            return _TYPE_TAGS[name]
        if module == "torch" and name in STORAGE_DTYPES:
            return _Storage(name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which a module's weights do not need")

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _Storage)):
            raise pickle.UnpicklingError(f"unknown storage reference {str(pid)[:80]}")
        _, kind, key, _location, numel = pid
        key = str(key)
        if key not in self.storages:
            try:
                data = bytearray(self.archive.read(f"{self.prefix}data/{key}"))
            except KeyError:
                raise pickle.UnpicklingError(f"storage {key} is missing") from None
            itemsize = torch.empty(0, dtype=kind.dtype).element_size()
            if len(data) < int(numel) * itemsize:
                raise pickle.UnpicklingError(f"storage {key} is shorter than its {numel} elements")
            flat = torch.frombuffer(data, dtype=kind.dtype) if data else torch.empty(0, dtype=kind.dtype)
            self.storages[key] = flat[:int(numel)]
        return self.storages[key]


def _collect(node: Any, prefix: str, out: dict[str, torch.Tensor], seen: set[int]) -> None:
    """Every tensor attribute of the module tree under its dotted path."""
    if id(node) in seen:
        return
    seen.add(id(node))
    state = getattr(node, "state", None)
    if isinstance(state, dict):
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                out[prefix + str(key)] = value
            elif isinstance(value, ScriptObject):
                _collect(value, f"{prefix}{key}.", out, seen)
    elif state is not None and _holds_tensor(state):
        raise SegXAIError(f"{node.qualified_name} keeps its tensors in a custom state (its own __getstate__), "
                          "whose names only its code knows")


def _holds_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return any(_holds_tensor(v) for v in value)
    if isinstance(value, dict):
        return any(_holds_tensor(v) for v in value.values())
    return False


def read_archive_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Parameters and buffers of a TorchScript archive by module path, read without running its code.

    Raises:
        SegXAIError: not a TorchScript archive, or one whose pickle names anything but tensors, storages and
            TorchScript classes (then it is not read on).
    """
    path = Path(path)
    names = _records(path)
    prefix = _prefix(names) if names is not None else None
    if prefix is None:
        raise SegXAIError(f"{path} is not a TorchScript archive (a zip with code/ and constants.pkl)")
    try:
        with zipfile.ZipFile(path) as archive:
            order = archive.read(f"{prefix}byteorder").decode().strip() if f"{prefix}byteorder" in names else "little"
            if order != sys.byteorder:
                raise SegXAIError(f"{path} was written on a machine of another byte order; re-save it here")
            with archive.open(f"{prefix}data.pkl") as stream:
                root = _ArchiveUnpickler(stream, archive, prefix).load()
    except SegXAIError:
        raise
    except (pickle.UnpicklingError, KeyError, EOFError, ValueError, TypeError, RuntimeError, AttributeError,
            IndexError, zipfile.BadZipFile, OSError) as exc:
        raise SegXAIError(f"cannot read the weights of the TorchScript archive {path} without running its code "
                          f"({str(exc)[:150]})") from None
    if not isinstance(root, ScriptObject):
        raise SegXAIError(f"the TorchScript archive {path} does not hold a module")
    found: dict[str, torch.Tensor] = {}
    try:
        _collect(root, "", found, set())
    except SegXAIError as exc:
        raise SegXAIError(f"cannot read the weights of the TorchScript archive {path}: {exc}") from None
    return {name: tensor.clone() for name, tensor in found.items()}
