"""The package layers hold: a package imports only the packages below it (README, "Layout").

The contract lives in pyproject.toml (``[tool.importlinter]``); import-linter checks every
import, the ones inside functions included.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_no_package_imports_a_higher_layer_and_reconcile_shares_no_logic():
    result = lint_imports()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Packages import only the layers below them KEPT" in result.stdout
    assert "recovery.reconcile imports nothing of operators/ or state/ KEPT" in result.stdout
    assert "0 broken" in result.stdout


def test_the_layers_name_every_product_package_once():
    config = pyproject()
    (contract,) = [c for c in config["tool"]["importlinter"]["contracts"] if c["type"] == "layers"]
    top_level = {name.split(".")[0] for name in config["tool"]["setuptools"]["packages"]}
    assert sorted(contract["layers"]) == sorted(top_level)
    assert len(set(contract["layers"])) == len(contract["layers"])


def test_an_upside_down_order_is_reported_broken(tmp_path: Path):
    """The check sees the real imports: the same layers upside down must break."""
    config = pyproject()["tool"]["importlinter"]
    (contract,) = [c for c in config["contracts"] if c["type"] == "layers"]
    layers = list(reversed(contract["layers"]))
    quoted = ", ".join(f'"{name}"' for name in layers)
    upside_down = tmp_path / "upside_down.toml"
    upside_down.write_text(
        f"[tool.importlinter]\nroot_packages = [{quoted}]\n\n"
        f'[[tool.importlinter.contracts]]\nname = "upside down"\ntype = "layers"\nlayers = [{quoted}]\n')
    result = lint_imports("--config", str(upside_down))
    assert result.returncode != 0
    assert "upside down BROKEN" in result.stdout
    assert "state.records" in result.stdout  # e.g. sinks.encoding -> state.records, now forbidden


def test_the_test_oracles_import_no_product_code():
    """tests/oracle/ computes expected values the plain way: a shared bug could hide otherwise."""
    import ast

    product = set(pyproject()["tool"]["importlinter"]["root_packages"])
    oracles = sorted((REPO / "tests" / "oracle").glob("*.py"))
    assert oracles
    for path in oracles:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not {name.split(".")[0] for name in names} & product, f"{path.name} imports {names}"


def test_the_readme_layout_names_every_package_and_subpackage():
    readme = (REPO / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    rows = {line.split("|")[1].strip().strip("`") for line in layout.splitlines()
            if line.startswith("| `")}
    assert rows == {f"{name}/" for name in pyproject()["tool"]["importlinter"]["root_packages"]} | {"tests/"}
    for package in pyproject()["tool"]["setuptools"]["packages"]:
        if "." in package:
            top, sub = package.split(".", 1)
            assert f"`{sub}/`" in layout, f"the layout table does not name {top}/{sub}/"
