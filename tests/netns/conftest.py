"""Fixtures of the namespace tests: skip where namespaces cannot be made, and fail any module that leaves
one behind (netns_testlib names every namespace with this process's tag)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from netns_testlib import leftover_namespaces, netns_unavailable


@pytest.fixture(scope="session")
def netns_ok() -> None:
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture(autouse=True, scope="module")
def _no_leftover_namespaces() -> Iterator[None]:
    """Torn down after every other fixture of the module (autouse fixtures are set up first)."""
    yield
    assert not leftover_namespaces()
