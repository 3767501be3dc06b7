"""Issue 11: a face-detector file cannot run code of its own.

Each hostile TorchScript archive is built here (scripted modules whose ``__setstate__`` or
``forward`` write files, or archives edited in the zip) and must be refused before any of its code
runs: ``torch.jit.load`` is never reached, no marker file appears and the victim file keeps its
bytes. Checked through the loader, the Face Mask Detect node and ``python -m sonic_core animate``.
A first test proves the archives are truly hostile: plain ``torch.jit.load`` runs them.
"""

from __future__ import annotations

import ast
import io
import pickletools
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from sonic_core.models import face_detector as fd
from sonic_core.models.torchscript_check import UnsafeTorchScriptError, check_archive
from sonic_core.weights import CheckpointError
from tests._golden import REPO

VICTIM_TEXT = b"x = 1  # victim\n"
OVERWRITE = [105, 109, 112, 111]  # b"impo": the start of "import os; os.system(...)"


class SaveAndOverwrite(nn.Module):
    """The attack of the issue: __setstate__ and forward save a file and overwrite another one."""

    def __init__(self, marker: str, victim: str):
        super().__init__()
        self.marker = marker
        self.victim = victim

    def forward(self, x: torch.Tensor, grids: list[torch.Tensor]) -> torch.Tensor:
        torch.save(torch.zeros(1), self.marker + ".forward")
        t = torch.from_file(self.victim, shared=True, size=4, dtype=torch.uint8)
        t.copy_(torch.tensor([105, 109, 112, 111], dtype=torch.uint8))  # OVERWRITE
        return torch.zeros(1, 10, 16) + t.sum() * 0

    @torch.jit.export
    def __getstate__(self) -> tuple[str, str, bool]:
        return (self.marker, self.victim, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, str, bool]) -> None:
        self.marker = state[0]
        self.victim = state[1]
        self.training = state[2]
        torch.save(torch.zeros(1), self.marker)
        t = torch.from_file(self.victim, shared=True, size=4, dtype=torch.uint8)
        t.copy_(torch.tensor([105, 109, 112, 111], dtype=torch.uint8))  # OVERWRITE
        self.marker = self.marker + str(int(t.sum()))


class WritesInForward(nn.Module):
    """Only forward writes: every detection would drop a file."""

    def __init__(self, marker: str):
        super().__init__()
        self.marker = marker

    def forward(self, x: torch.Tensor, grids: list[torch.Tensor]) -> torch.Tensor:
        torch.save(x, self.marker)
        return torch.zeros(1, 10, 16)


class SetstateComputes(nn.Module):
    """__setstate__ that computes instead of assigning (harmless here, refused all the same)."""

    def __init__(self):
        super().__init__()
        self.count = 1

    def forward(self, x: torch.Tensor, grids: list[torch.Tensor]) -> torch.Tensor:
        return torch.zeros(1, 10, 16) * self.count

    @torch.jit.export
    def __getstate__(self) -> tuple[int, bool]:
        return (self.count, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[int, bool]) -> None:
        self.count = state[0] + 1
        self.training = state[1]


class UnknownOp(nn.Module):
    def forward(self, x: torch.Tensor, grids: list[torch.Tensor]) -> torch.Tensor:
        return torch.cumsum(torch.zeros(1, 10, 16), 1)  # a harmless op that is not on the list


class Harmless(nn.Module):
    def forward(self, x: torch.Tensor, grids: list[torch.Tensor]) -> torch.Tensor:
        return torch.zeros(1, 10, 16)


def _script(module: nn.Module, path: Path) -> Path:
    torch.jit.save(torch.jit.script(module), str(path))
    return path


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy archive ``src`` to ``dst`` with ``edit(name, bytes) -> bytes | None`` applied per entry."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = edit(info.filename, zin.read(info))
            if data is not None:
                zout.writestr(info.filename, data)
    return dst


def _first_global(pkl: bytes) -> str:
    return next(arg for op, arg, _ in pickletools.genops(pkl) if op.name == "GLOBAL")


def _replace_root_class(data: bytes, module: str, name: str) -> bytes:
    old = _first_global(data).replace(" ", "\n").encode()
    return data.replace(b"c" + old + b"\n", f"c{module}\n{name}\n".encode(), 1)


def _code_edit(old: str, new: str):
    def edit(name: str, data: bytes) -> bytes:
        return data.replace(old.encode(), new.encode(), 1) if name.endswith(".py") and "/code/" in name else data
    return edit


def _hostile(kind: str, tmp: Path, marker: Path, victim: Path) -> tuple[Path, str]:
    """(archive, text the refusal must name) for each hostile kind."""
    path = tmp / f"{kind}.pt"
    if kind == "save_and_overwrite":
        return _script(SaveAndOverwrite(str(marker), str(victim)), path), "op torch.save: not on the allowlist"
    if kind == "forward_writes":
        return _script(WritesInForward(str(marker)), path), "op torch.save"
    if kind == "forward_opens":  # Python's open() written into the serialized code
        src = _script(Harmless(), tmp / "harmless_open.pt")
        edit = _code_edit("return torch.zeros([1, 10, 16])",
                          f"_f = open({str(marker)!r}, 'w')\n    return torch.zeros([1, 10, 16])")
        return _rewrite(src, path, edit), "call to open: not on the allowlist"
    if kind == "setstate_computes":
        return _script(SetstateComputes(), path), "__setstate__ does more than plain attribute assignments"
    if kind == "unknown_op":
        return _script(UnknownOp(), path), "op torch.cumsum: not on the allowlist"
    if kind == "class_not_in_archive":  # data.pkl names a TorchBind class with C++ __setstate__
        src = _script(Harmless(), tmp / "harmless_class.pt")
        torchbind = ("__torch__.torch.classes.quantized", "Conv2dPackedParamsBase")
        path = _rewrite(src, path, lambda n, d: _replace_root_class(d, *torchbind) if n.endswith("/data.pkl") else d)
        return path, f"class {'.'.join(torchbind)} is not defined in the archive's code"
    if kind == "pickle_global":  # data.pkl that would run a shell command under pickle.load
        src = _script(Harmless(), tmp / "harmless_pickle.pt")
        evil = b"cos\nsystem\n(V touch " + str(marker).encode() + b"\ntR."
        return _rewrite(src, path, lambda n, d: evil if n.endswith("/data.pkl") else d), \
            "global os.system is not on the allowlist"
    raise ValueError(kind)


KINDS = ["save_and_overwrite", "forward_writes", "forward_opens", "setstate_computes", "unknown_op",
         "class_not_in_archive", "pickle_global"]


@pytest.fixture
def victim(tmp_path):
    path = tmp_path / "victim.py"
    path.write_bytes(VICTIM_TEXT)
    return path


def _untouched(marker: Path, victim: Path) -> None:
    assert not list(marker.parent.glob(marker.name + "*")), "hostile code ran: a marker file exists"
    assert victim.read_bytes() == VICTIM_TEXT, "hostile code ran: the victim file changed"


@pytest.fixture
def no_jit_load(monkeypatch):
    calls = []
    real = torch.jit.load
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: calls.append(a) or real(*a, **k))
    return calls


def test_the_archives_are_hostile_under_plain_jit_load(tmp_path, victim):
    marker = tmp_path / "marker"
    path, _ = _hostile("save_and_overwrite", tmp_path, marker, victim)
    module = torch.jit.load(str(path))  # what the loader did before: runs __setstate__
    assert marker.exists() and victim.read_bytes()[:4] == bytes(OVERWRITE)
    module(torch.zeros(1, 3, 32, 32), [])  # and forward
    assert list(tmp_path.glob("marker*.forward"))


@pytest.mark.parametrize("kind", KINDS)
def test_loader_refuses_before_any_code_runs(tmp_path, victim, no_jit_load, kind):
    marker = tmp_path / "marker"
    path, found = _hostile(kind, tmp_path, marker, victim)
    with pytest.raises(UnsafeTorchScriptError) as err:
        fd.YoloFaceDetector.from_file(str(path), "cpu")
    msg = str(err.value)
    assert str(path) in msg and found in msg and "none of it was loaded or run" in msg
    assert no_jit_load == []
    _untouched(marker, victim)


def test_refusal_names_entry_and_line(tmp_path):
    path = _script(UnknownOp(), tmp_path / "op.pt")
    with zipfile.ZipFile(path) as z:
        entry = next(n for n in z.namelist() if n.endswith(".py"))
        line = next(i for i, t in enumerate(z.read(entry).decode().splitlines(), 1) if "torch.cumsum" in t)
    with pytest.raises(UnsafeTorchScriptError, match="op torch.cumsum") as err:
        check_archive(path.read_bytes(), "op.pt")
    assert f"{entry.split('/', 1)[1]}:{line}: op torch.cumsum: not on the allowlist" in str(err.value)


@pytest.mark.parametrize("old, new, found", [
    ("return torch.zeros([1, 10, 16])", "return torch.ops.myns.run(x)", "namespace 'myns'"),
    ("return torch.zeros([1, 10, 16])", "return ops.aten.from_file('/etc/passwd')", "op ops.aten.from_file"),
    ("return torch.zeros([1, 10, 16])", "return getattr(torch, 'save')(x, 'm')", "name 'torch' is not a local"),
    ("return torch.zeros([1, 10, 16])", "return torch._C._jit_run(x)", "torch._C._jit_run"),
    ("return torch.zeros([1, 10, 16])", "return x.__class__", "dunder attribute '__class__'"),
    ("return torch.zeros([1, 10, 16])", "return __import__('os').system('true')", "call to __import__"),
    ("return torch.zeros([1, 10, 16])", "return (lambda: x)()", "Lambda"),
    ("    return torch.zeros([1, 10, 16])", "    import os\n    return x", "Import statement"),
    ("return torch.zeros([1, 10, 16])", "return (x).save('m')", "method call .save()"),
])
def test_code_tricks_are_refused(tmp_path, old, new, found):
    src = _script(Harmless(), tmp_path / "h.pt")
    check_archive(src.read_bytes())  # the unedited archive passes
    path = _rewrite(src, tmp_path / "edited.pt", _code_edit(old, new))
    with pytest.raises(UnsafeTorchScriptError, match="refused") as err:
        check_archive(path.read_bytes(), str(path))
    assert found in str(err.value)


def test_zip_tricks_are_refused(tmp_path):
    src = _script(Harmless(), tmp_path / "h.pt")
    dup = tmp_path / "dup.pt"
    shutil.copy(src, dup)
    with zipfile.ZipFile(src) as z:
        code = next(n for n in z.namelist() if n.endswith(".py"))
    with pytest.warns(UserWarning, match="Duplicate name"), zipfile.ZipFile(dup, "a") as z:
        z.writestr(code, b"class Harmless(Module):\n  pass\n")  # a second copy of a code entry
    with pytest.raises(UnsafeTorchScriptError, match="duplicated"):
        check_archive(dup.read_bytes())
    extra = _rewrite(src, tmp_path / "extra.pt", lambda n, d: d)
    with zipfile.ZipFile(extra, "a") as z:
        z.writestr(code.split("/")[0] + "/bytecode.pkl", b"")
        z.writestr("elsewhere/code/__torch__/x.py", b"")
    with pytest.raises(UnsafeTorchScriptError, match="not part of the TorchScript layout") as err:
        check_archive(extra.read_bytes())
    assert "outside the archive folder" in str(err.value)
    for data in (b"not a zip", zipfile_bytes({"a/data.pkl": b""})):
        with pytest.raises(CheckpointError, match="not a TorchScript archive"):
            check_archive(data)


def test_torchbind_classes_cannot_be_shadowed_by_archive_code(tmp_path):
    """torch resolves __torch__.torch.classes.* to its registered C++ classes, whatever the archive
    defines under that name; so no archive code may live there."""
    src = _script(Harmless(), tmp_path / "h.pt")
    folder = zipfile.ZipFile(src).namelist()[0].split("/")[0]
    torchbind = ("__torch__.torch.classes.quantized", "Conv2dPackedParamsBase")
    path = _rewrite(src, tmp_path / "shadow.pt",
                    lambda n, d: _replace_root_class(d, *torchbind) if n.endswith("/data.pkl") else d)
    with zipfile.ZipFile(path, "a") as z:
        z.writestr(f"{folder}/code/__torch__/torch/classes/quantized.py",
                   "class Conv2dPackedParamsBase(Module):\n  __parameters__ = []\n  training : bool\n")
    with pytest.raises(UnsafeTorchScriptError, match="reserved for TorchBind classes"):
        check_archive(path.read_bytes())


def test_metadata_and_extra_files_are_data(tmp_path):
    src = _script(Harmless(), tmp_path / "h.pt")
    folder = zipfile.ZipFile(src).namelist()[0].split("/")[0]
    path = _rewrite(src, tmp_path / "meta.pt", lambda n, d: d)
    with zipfile.ZipFile(path, "a") as z:
        z.writestr(f"{folder}/extra/config.txt", b'{"stride": [8, 16, 32]}')  # torch.jit.save _extra_files
        z.writestr(f"{folder}/.format_version", b"1")
    check_archive(path.read_bytes())
    with zipfile.ZipFile(path, "a") as z:
        z.writestr(f"{folder}/.data/extra.pkl", b"")
    with pytest.raises(UnsafeTorchScriptError, match=r"\.data/extra\.pkl: entry not part"):
        check_archive(path.read_bytes())


def zipfile_bytes(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return buf.getvalue()


@pytest.mark.parametrize("kind", KINDS)
def test_node_refuses_before_any_code_runs(tmp_path, victim, monkeypatch, no_jit_load, kind):
    from nodes import nodes_face, runtime

    marker = tmp_path / "marker"
    path, found = _hostile(kind, tmp_path, marker, victim)
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(path, models / "yoloface_v5m.pt")
    monkeypatch.setenv(runtime.MODELS_ENV, str(models))
    monkeypatch.setattr(nodes_face, "_DETECTOR_CACHE", {})
    node = nodes_face.SonicFaceMaskDetect()
    with pytest.raises(UnsafeTorchScriptError, match="yoloface_v5m.pt") as err:
        node.detect(torch.rand(1, 96, 96, 3), "yoloface_v5m.pt", False, 0.5, 1.1, 0.5, "error")
    assert found in str(err.value) and no_jit_load == []
    _untouched(marker, victim)


@pytest.fixture(scope="module")
def cli_models(tmp_path_factory):
    """A complete tiny models folder (selftest layout); each CLI test puts its detector in it."""
    from sonic_core import selftest

    root = tmp_path_factory.mktemp("cli_models")
    selftest.write_tiny_models(root)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_cli_refuses_before_any_code_runs(tmp_path, victim, cli_models, kind):
    from PIL import Image

    from sonic_core import selftest

    marker = tmp_path / "marker"
    path, found = _hostile(kind, tmp_path, marker, victim)
    shutil.copy(path, cli_models / "yoloface_v5m.pt")
    Image.new("RGB", (96, 96), (200, 150, 120)).save(tmp_path / "p.png")  # opaque: the detector is needed
    voice = selftest.write_voice(tmp_path / "v.wav")
    out = tmp_path / "o.mp4"
    run = subprocess.run([sys.executable, "-m", "sonic_core", "animate", str(tmp_path / "p.png"), str(voice),
                          "-o", str(out), "--models", str(cli_models), "--device", "cpu"],
                         cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 2, run.stderr
    assert "refused" in run.stderr and "yoloface_v5m.pt" in run.stderr and found in run.stderr
    assert "Traceback" not in run.stderr and not out.exists()
    _untouched(marker, victim)


# ----------------------------------------------------------------------------------------------
# static: torch.jit.load only behind the check, torch.load only with weights_only=True
# ----------------------------------------------------------------------------------------------
def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _sources():
    for folder in ("sonic_core", "nodes"):
        for path in sorted((REPO / folder).rglob("*.py")):
            yield path, ast.parse(path.read_text(), filename=str(path))


def test_jit_load_is_reached_only_through_the_checked_loader():
    sites = []
    for path, tree in _sources():
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):  # no way around the attribute name
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(n in ("jit", "torch.jit") or n.startswith("torch.jit.") for n in names), path
            if isinstance(node, ast.Attribute) and node.attr in ("load", "import_ir_module") and \
                    _dotted(node.value).endswith(("jit", "_C")):
                sites.append((path.relative_to(REPO).as_posix(), node))
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and node.id in ("import_ir_module", "_load_for_lite_interpreter"):
                pytest.fail(f"{path}: {node.id}")
    assert [s for s, _ in sites] == ["sonic_core/models/torchscript_check.py"]
    tree = ast.parse((REPO / "sonic_core/models/torchscript_check.py").read_text())
    loader = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "load_checked")
    calls = [n for n in ast.walk(loader) if isinstance(n, ast.Call)]
    check = next(n for n in calls if _dotted(n.func) == "check_archive")
    load = next(n for n in calls if _dotted(n.func) == "torch.jit.load")
    assert check.lineno < load.lineno, "the check must come before torch.jit.load"
    # the very bytes that were checked are loaded: check_archive(data, ...) and jit.load(BytesIO(data))
    assert _dotted(check.args[0]) == "data" and ast.unparse(load.args[0]) == "io.BytesIO(data)"
    assert sites[0][1].lineno == load.func.lineno


def test_every_torch_load_uses_weights_only():
    found = 0
    for path, tree in _sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _dotted(node.func) in ("torch.load", "torch.serialization.load"):
                found += 1
                kw = {k.arg: k.value for k in node.keywords}
                assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, \
                    f"{path}:{node.lineno}: torch.load without weights_only=True"
            if isinstance(node, ast.Call) and _dotted(node.func) in ("pickle.load", "pickle.loads"):
                pytest.fail(f"{path}:{node.lineno}: unrestricted pickle")
    assert found >= 1
