"""The examples in the state modules' docstrings run, and print what they claim."""

from __future__ import annotations

import doctest
from types import ModuleType

import pytest

from state import consumed, erasure, expiry, keys, layout, session, store


@pytest.mark.parametrize(
    "module",
    [session, store, expiry, consumed, erasure, layout, keys],
    ids=lambda m: m.__name__,
)
def test_the_docstring_examples_hold(module: ModuleType) -> None:
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
