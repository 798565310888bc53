"""Shared fixtures for training tests: tiny, seeded, CPU-only, 2 threads (the target box has 2 cores)."""

import pytest
import torch

import training


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def digits() -> training.Task:
    return training.load_task("digits")
