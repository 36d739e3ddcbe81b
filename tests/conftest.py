"""Shared fixtures. Ray must bind 127.0.0.1 only: on Linux it otherwise resolves the external interface."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

REPO = Path(__file__).resolve().parent.parent
TIRE_ROOT = REPO / "data" / "tire_small"


@pytest.fixture(scope="session")
def tire_root() -> Path:
    return TIRE_ROOT
