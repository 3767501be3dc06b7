"""Static check of a TorchScript archive (``yoloface_v5m.pt``) before ``torch.jit.load``.

A TorchScript file carries a program: ``code/**.py`` (run at load by ``__setstate__`` and at every
call by ``forward``) and pickles naming the classes to build. ``torch.jit.load`` runs all of it,
file-writing ops included (``torch.save``, ``torch.from_file(..., shared=True)`` + ``copy_``).

``load_checked`` reads the file once, checks those bytes, and only then hands the same bytes to
``torch.jit.load`` (so the file cannot change between check and load). The check runs nothing of
the archive:

* the zip must have the TorchScript layout (one top folder; code, pickles, raw storages, metadata
  such as ``version``), no duplicated, encrypted or escaping entry names, no other code or pickle;
* the code entries must pass ``torchscript_code`` (the reviewed op allowlist);
* ``data.pkl``, ``constants.pkl``, ``traced_inputs.pkl`` and the ``.debug_pkl`` entries are read
  by a restricted unpickler that knows only ``PICKLE_GLOBALS`` (tensor rebuilds, storage types,
  ``OrderedDict``, TorchScript list builders) and the ``__torch__`` classes the code defines, as
  inert placeholders; persistent ids only record storage keys.

Anything else raises ``UnsafeTorchScriptError`` naming the file and each finding (entry, line,
what), before ``torch.jit.load`` is reached.
"""

from __future__ import annotations

import ast
import collections
import io
import logging
import os
import pickle
import zipfile
import zlib

import torch

from .. import config
from ..weights import CheckpointError
from .torchscript_code import PLAIN_NAME, CheckedArchive, check_sources

log = logging.getLogger(__name__)

PICKLE_GLOBALS = frozenset({
    ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"), ("collections", "OrderedDict"), ("torch", "device"),
    *(("torch.jit._pickle", f) for f in ("build_intlist", "build_tensorlist", "build_doublelist",
                                         "build_boollist", "restore_type_tag")),
    *(("torch", f"{t}Storage") for t in ("Float", "Double", "Half", "BFloat16", "Long", "Int", "Short",
                                         "Char", "Byte", "Bool")),
})
# Data entries, never interpreted: raw storages, user extra files (read only when asked for) and
# format metadata (version, byteorder, .data/serialization_id, ...). Code and pickles are checked.
DATA_FOLDERS = ("data/", "constants/", "traced_inputs/", ".data/")
EXTRA_FOLDER = "extra/"  # torch.jit.load(_extra_files=None) never reads these (any name)
PICKLES = ("data.pkl", "constants.pkl", "traced_inputs.pkl")
CODE_SUFFIXES = (".py", ".pkl", ".json")  # a root entry ending so that is not in PICKLES is refused


class UnsafeTorchScriptError(CheckpointError):
    """A TorchScript file holds code or data outside the reviewed allowlist; nothing of it ran."""


class _Placeholder:
    """Stands in for an object of a class the archive defines; the real class is never built."""

    qualname = ""

    def __init__(self, *args):
        self.args = args

    def __setstate__(self, state):
        self.state = state


class _RestrictedUnpickler(pickle.Unpickler):
    """Knows the archive's classes (as placeholders) and ``PICKLE_GLOBALS`` (as inert records)."""

    def __init__(self, data: bytes, archive: CheckedArchive, entry: str):
        super().__init__(io.BytesIO(data))
        self.archive, self.entry = archive, entry
        self.placeholders: dict[str, type] = {}

    def find_class(self, module: str, name: str):
        qualname = f"{module}.{name}"
        if module == "__torch__" or module.startswith("__torch__."):
            if qualname not in self.archive.classes:
                raise pickle.UnpicklingError(f"class {qualname} is not defined in the archive's code")
            return self.placeholders.setdefault(qualname, type(name, (_Placeholder,), {"qualname": qualname}))
        if (module, name) not in PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"global {qualname} is not on the allowlist")
        if name == "OrderedDict":
            return collections.OrderedDict
        return lambda *args, **kwargs: (qualname, args)  # a record of the call, never the function

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage" and isinstance(pid[2], str)
                and PLAIN_NAME.fullmatch(pid[2])):
            raise pickle.UnpicklingError(f"persistent id {pid!r} is not a storage reference")
        self.archive.storages.add(f"{self.entry}:{pid[2]}")
        return ("storage", pid[2])


def _read_pickle(data: bytes, archive: CheckedArchive, entry: str) -> None:
    try:
        _RestrictedUnpickler(data, archive, entry).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, LookupError,
            OverflowError) as e:  # our UnpicklingError, or a malformed stream (anything else propagates)
        archive.refuse(entry, None, f"pickle refused ({type(e).__name__}: {e})")


def _entries(data: bytes, name: str) -> tuple[zipfile.ZipFile, list[tuple[zipfile.ZipInfo, str]]]:
    """The zip and its entries with names below the archive folder; CheckpointError if not TorchScript."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise CheckpointError(f"{name}: not a TorchScript archive (not a zip file: {e}); use the official "
                              "yoloface_v5m.pt") from e
    prefix = infos[0].filename.split("/")[0] + "/" if infos and "/" in infos[0].filename else ""
    rel = [i.filename[len(prefix):] if prefix and i.filename.startswith(prefix) else "/" + i.filename
           for i in infos]
    if not any(r.startswith("code/") for r in rel) or "data.pkl" not in rel:
        raise CheckpointError(f"{name}: not a TorchScript archive (no code/ or data.pkl entries: a torch.save "
                              "pickle or a legacy format); use the official yoloface_v5m.pt")
    return zf, list(zip(infos, rel))


def _read(zf: zipfile.ZipFile, info: zipfile.ZipInfo, name: str) -> bytes:
    try:
        return zf.read(info)
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as e:
        raise CheckpointError(f"{name}: entry {info.filename} cannot be read ({type(e).__name__}: {e}); the "
                              "file is damaged, download it again") from e


def check_archive(data: bytes, name: str = "archive") -> CheckedArchive:
    """Check TorchScript archive bytes; UnsafeTorchScriptError (naming ``name``) on any finding."""
    zf, entries = _entries(data, name)
    archive, sources = CheckedArchive(), {}
    names = collections.Counter(info.filename for info, _ in entries)
    for info, r in entries:
        code, pickled = r.startswith("code/") and r.endswith(".py"), r in PICKLES or r.endswith(".py.debug_pkl")
        if r.startswith("/") or names[info.filename] > 1 or info.flag_bits & 0x1 or ".." in r.split("/"):
            archive.refuse(info.filename, None, "entry outside the archive folder, duplicated or encrypted")
        elif (code or pickled) and info.file_size > config.TORCHSCRIPT_MAX_ENTRY_BYTES:
            archive.refuse(r, None, f"entry of {info.file_size} bytes")
        elif code:
            try:
                sources[r] = ast.parse(_read(zf, info, name).decode("utf-8"), filename=r)
            except (SyntaxError, UnicodeDecodeError, ValueError) as e:
                archive.refuse(r, getattr(e, "lineno", None), f"not parseable TorchScript source ({e})")
        elif not (pickled or r.startswith(EXTRA_FOLDER) or (r.startswith(DATA_FOLDERS) and not r.endswith(CODE_SUFFIXES))
                  or ("/" not in r and not r.endswith(CODE_SUFFIXES))):
            archive.refuse(r, None, "entry not part of the TorchScript layout")
    check_sources(sources, archive)
    for info, r in entries:
        if (r in PICKLES or r.endswith(".py.debug_pkl")) and info.file_size <= config.TORCHSCRIPT_MAX_ENTRY_BYTES:
            _read_pickle(_read(zf, info, name), archive, r)
    if archive.findings:
        n, found = config.TORCHSCRIPT_FINDINGS_LISTED, archive.findings
        more = f"; ... ({len(found) - n} more)" if len(found) > n else ""
        raise UnsafeTorchScriptError(
            f"{name}: refused, this TorchScript file holds code or data outside the face detector's reviewed "
            f"allowlist, so none of it was loaded or run ({len(found)} finding(s): "
            f"{'; '.join(str(f) for f in found[:n])}{more}). Use the official yoloface_v5m.pt from "
            "huggingface.co/LeonJoe13/Sonic, or choose detector 'none' and draw the face mask")
    return archive


def load_checked(path: str | os.PathLike, map_location: torch.device | str) -> torch.jit.ScriptModule:
    """``torch.jit.load`` of ``path``, only after ``check_archive`` passed on the very same bytes."""
    with open(path, "rb") as f:
        data = f.read()
    archive = check_archive(data, str(path))
    log.info("%s: TorchScript check passed (%d classes, %d functions, %d calls)", path, len(archive.classes),
             len(archive.functions), sum(archive.ops.values()))
    return torch.jit.load(io.BytesIO(data), map_location=map_location)
