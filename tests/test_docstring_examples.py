"""The usage examples in docstrings are run, so they cannot drift from the code."""

import doctest
import importlib
import pkgutil

import pytest

PACKAGES = ("dataflows", "operators", "state", "sinks", "recovery", "deploy", "oracle")  # + the test oracles


def modules() -> list[str]:
    names = []
    for package in PACKAGES:
        module = importlib.import_module(package)
        names += [info.name for info in pkgutil.walk_packages(list(module.__path__), f"{package}.")
                  if not info.name.endswith(".__main__")]  # sub-packages too (deploy.bench)
    return sorted(set(names))  # every module imports without side effects, dataflows.usage too


@pytest.mark.parametrize("name", modules())
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
