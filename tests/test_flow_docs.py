"""The examples in the flow modules' docstrings run, and print what they claim."""

from __future__ import annotations

import doctest
from types import ModuleType

import pytest

from flows import output, pacing, worker
from flows.guarantee import at_least_once, exactly_once

MODULES = [output, pacing, worker, at_least_once, exactly_once]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_the_docstring_examples_hold(module: ModuleType) -> None:
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
