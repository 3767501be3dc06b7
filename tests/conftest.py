"""Shared pytest fixtures: the golden case (see tests/_golden.py)."""

from __future__ import annotations

import logging

import pytest
import torch

from tests._golden import load_golden

torch.set_num_threads(max(1, torch.get_num_threads()))
logging.getLogger("sonic_core").setLevel(logging.INFO)


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
