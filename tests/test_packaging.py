"""The wheel ships every part of the package: each folder of the checkout with an `__init__.py`
is listed in pyproject's packages, and the recipes are package data. (`make wheel-check` builds
and installs the wheel and runs the demo from it; this catches a new subpackage in seconds.)"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from noisyseg.recipes import recipe_names

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the package `noisyseg`
NOT_PACKAGED = {"tests", "benchmarks", "docs", "build", "runs"}


def test_every_subpackage_is_listed_in_pyproject() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = set()
    for folder, subfolders, files in os.walk(ROOT):
        # Not into .venv, .git and the like, nor the folders that are not part of the package.
        subfolders[:] = [
            d for d in subfolders if not d.startswith(".") and d not in NOT_PACKAGED and d != "__pycache__"
        ]
        if "__init__.py" in files:
            found.add(".".join(("noisyseg", *Path(folder).relative_to(ROOT).parts)))
    assert found == set(setuptools["packages"])
    assert setuptools["package-data"]["noisyseg.recipes"] == ["*.yaml"]
    assert recipe_names() and all((ROOT / "recipes" / f"{name}.yaml").is_file() for name in recipe_names())
