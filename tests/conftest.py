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
