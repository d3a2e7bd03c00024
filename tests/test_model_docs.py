"""The examples in the model modules' docstrings run, and print what they claim."""

from __future__ import annotations

import doctest
import importlib
from types import ModuleType

import pytest

RUNTIME = [
    "model.data",
    "model.metrics",
    "model.candidates",
    "model.baselines",
    "model.card",
    "model.budget",
]
TRAINING = [
    "model.sasrec",
    "model.hybrid",
    "model.losses",
    "model.search",
    "model.evaluation",
    "model.pipeline",
]


def check(module: ModuleType) -> None:
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


@pytest.mark.parametrize("name", [*RUNTIME, "model.serving"])
def test_the_docstring_examples_hold(name: str) -> None:
    check(importlib.import_module(name))


@pytest.mark.train
@pytest.mark.parametrize("name", TRAINING)
def test_the_training_docstring_examples_hold(name: str) -> None:
    pytest.importorskip("torch")
    check(importlib.import_module(name))
