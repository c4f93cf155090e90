"""Fixtures for tests/pipelines: tiny random model folders (written by tiny_models.py), once per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# Test modules are not a package (importlib import mode), so make the helper module next to them
# importable by its own name: `from tiny_models import write_tiny_sd`.
if str(Path(__file__).parent) not in sys.path:
    sys.path.append(str(Path(__file__).parent))

from tiny_models import write_tiny_blip, write_tiny_sd


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    """A tiny diffusers Stable Diffusion folder; copy it before changing it."""
    return write_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def tiny_blip(tmp_path_factory) -> Path:
    """A tiny BLIP captioning folder; copy it before changing it."""
    return write_tiny_blip(tmp_path_factory.mktemp("tiny-blip"))
