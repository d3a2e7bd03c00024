"""The examples in the operator tools' and the benchmarks' docstrings run, and hold."""

from __future__ import annotations

import doctest
from types import ModuleType

import pytest

from bench import services as bench_services
from tools import services


@pytest.mark.parametrize("module", [services, bench_services], ids=lambda m: m.__name__)
def test_the_docstring_examples_hold(module: ModuleType) -> None:
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
