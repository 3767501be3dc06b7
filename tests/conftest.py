"""Shared pytest fixtures: the golden case (see tests/_golden.py), and the kernel settings a run uses.

CI runs the suite under several CPU kernel settings (.ci/run): ``ATEN_CPU_CAPABILITY``
(default/avx2/avx512: ATen's vectorised kernels), ``ONEDNN_MAX_CPU_ISA`` (oneDNN's convolutions
and matmuls) and ``SONIC_TEST_THREADS`` (torch threads, which change oneDNN's algorithm choice).
tests/test_kernels.py proves that each setting really took effect.
"""

from __future__ import annotations

import logging
import os
import tempfile

import pytest
import torch

from tests._golden import golden_base, load_golden

# the sampler node keeps resume states (nodes/runtime.resume_dir): one fresh folder per test session
os.environ.setdefault("SONIC_RESUME_DIR", tempfile.mkdtemp(prefix="sonic-test-resume-"))
# checkpoint digests (sonic_core/digest.py) are cached in a file of this session, not in ~/.cache
os.environ.setdefault("SONIC_DIGEST_CACHE", os.path.join(tempfile.mkdtemp(prefix="sonic-test-digests-"),
                                                         "file-digests.json"))
THREADS_ENV = "SONIC_TEST_THREADS"
if os.environ.get(THREADS_ENV):
    torch.set_num_threads(int(os.environ[THREADS_ENV]))
logging.getLogger("sonic_core").setLevel(logging.INFO)


def pytest_addoption(parser):
    parser.addoption("--golden-only", action="store_true",
                     help="run only the tests that read the golden case (the `golden` fixture or the golden "
                          "marker): CI's passes on derived variants of it (tests/_golden.py VARIANTS)")


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--golden-only"):
        return
    keep = [i for i in items if "golden" in getattr(i, "fixturenames", ()) or i.get_closest_marker("golden")]
    kept = {id(i) for i in keep}
    config.hook.pytest_deselected(items=[i for i in items if id(i) not in kept])
    items[:] = keep


def pytest_report_header(config):
    return (f"sonic kernels: ATen {torch.backends.cpu.get_cpu_capability()} "
            f"(ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY', '')!s}), "
            f"ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', '')!s}, "
            f"{torch.get_num_threads()} torch threads; golden case {golden_base()}")


@pytest.fixture(autouse=True)
def _own_resume_dir(tmp_path_factory, monkeypatch):
    """Each test its own sampler-node state folder: the node keeps finished results there, and one
    test's kept result must not spare another test's sampling (module fixtures use the session's)."""
    monkeypatch.setenv("SONIC_RESUME_DIR", str(tmp_path_factory.mktemp("sonic_resume")))


@pytest.fixture(scope="session")
def golden():
    """The golden parity case named by SONIC_GOLDEN (default: the public case in ../shared)."""
    return load_golden()


@pytest.fixture(scope="module")
def model_dir(golden, tmp_path_factory):
    """The golden case's tiny models as real files in a models/sonic-like folder: (root, loader inputs)."""
    from tests._model_files import write_golden_models

    root = tmp_path_factory.mktemp("sonic_models")
    return root, write_golden_models(golden, root)
