"""Shared test helpers: fixture paths, deterministic weights, single-threaded torch."""
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"

torch.set_num_threads(1)


def load_fixture(name):
    """Load a parity fixture from tests/fixtures (weights_only)."""
    return torch.load(FIXTURES / name, map_location="cpu", weights_only=True)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Tests never reach the network: hub libraries run offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")


@pytest.fixture(scope="module")
def sit_fix():
    """The SiT and sampler parity fixture (sit_tiny.pt)."""
    return load_fixture("sit_tiny.pt")


@pytest.fixture(scope="module")
def preprocess_fix():
    """The preprocessing parity fixture (preprocess.pt): ADM crops and encoder inputs."""
    return load_fixture("preprocess.pt")
