"""flows/, state/, model/, tools/ and bench/ are collected under their installed names.

Those folders install as streamrec.flows, streamrec.state, ... (package-dir in
pyproject.toml).  pytest would import flows/metrics.py as ``flows.metrics`` (and
flows/__init__.py as ``flows``): a second copy of ``streamrec.flows.metrics``, whose
prometheus metrics then register twice ("Duplicated timeseries").  These hooks swap
pytest's collectors for those folders (doctest modules, a module named on the command
line, packages) for ones that import the installed name, and check that the name leads
back to the same file.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Generator
from pathlib import Path
from types import ModuleType

import pytest
from _pytest.doctest import DoctestModule

ROOT = Path(__file__).resolve().parent
MAPPED = ("flows", "state", "model", "tools", "bench")  # package-dir in pyproject.toml
NEEDS_TORCH = re.compile(r"^\s*(import torch|from torch\b)", re.M)


def installed_name(path: Path) -> str | None:
    """``streamrec.flows.guarantee.base`` for flows/guarantee/base.py; None outside MAPPED."""
    try:
        parts = list(path.resolve().relative_to(ROOT).with_suffix("").parts)
    except ValueError:
        return None
    if not parts or parts[0] not in MAPPED:
        return None
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["streamrec", *parts])


def import_installed(name: str, path: Path) -> ModuleType:
    """Module ``name``, which must be the file ``path`` (the editable install's)."""
    if NEEDS_TORCH.search(path.read_text()):
        pytest.importorskip("torch")
    try:
        module = importlib.import_module(name)
    except Exception as exc:  # reported as pytest reports a module that does not import
        raise pytest.Collector.CollectError(f"importing {name}: {exc!r}") from exc
    where = Path(module.__file__ or "")
    if not where.exists() or not where.samefile(path):
        raise pytest.Collector.CollectError(
            f"{name} imports from {where}, not {path}: is streamrec installed in editable "
            "mode (pip install -e .) in this environment?"
        )
    return module


class InstalledDoctestModule(DoctestModule):
    module_name: str

    def _getobj(self) -> ModuleType:
        return import_installed(self.module_name, self.path)


class InstalledModule(pytest.Module):
    """A file of those folders named on the command line (pytest flows/pacing.py)."""

    module_name: str

    def _getobj(self) -> ModuleType:
        return import_installed(self.module_name, self.path)


class InstalledPackage(pytest.Package):
    """pytest's Package imports the folder's __init__.py in ``setup``."""

    module_name: str

    def setup(self) -> None:
        import_installed(self.module_name, self.path / "__init__.py")  # no setup_module here


@pytest.hookimpl(wrapper=True)
def pytest_collect_directory(
    path: Path, parent: pytest.Collector
) -> Generator[None, pytest.Collector | None, pytest.Collector | None]:
    collector = yield
    name = installed_name(path / "__init__.py")
    if name is None or type(collector) is not pytest.Package:
        return collector
    package = InstalledPackage.from_parent(parent, path=path)
    package.module_name = name
    return package


@pytest.hookimpl(wrapper=True)
def pytest_collect_file(
    file_path: Path, parent: pytest.Collector
) -> Generator[None, list[pytest.Collector], list[pytest.Collector]]:
    collectors = yield
    name = installed_name(file_path)
    if name is None or not collectors:  # not a module (model/artifacts/*.onnx, data files)
        return collectors
    source = file_path.read_text()
    swapped: list[pytest.Collector] = []
    for collector in collectors:
        if type(collector) is DoctestModule:
            # Modules without examples are not imported (bench/peers/quix_peer.py needs its venv).
            if ">>>" not in source:
                continue
            doctests = InstalledDoctestModule.from_parent(parent, path=file_path)
            doctests.module_name = name
            collector = doctests
        elif type(collector) is pytest.Module:
            module = InstalledModule.from_parent(parent, path=file_path)
            module.module_name = name
            collector = module
        if NEEDS_TORCH.search(source):
            collector.add_marker(pytest.mark.train)
        swapped.append(collector)
    return swapped
