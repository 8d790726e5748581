"""The papers' settings as ready configurations: `noisyseg train --recipe NAME`, listed by
`noisyseg recipes`.

A recipe is a YAML configuration file in this package (`NAME.yaml`, package data) read by the
config loader like any `--config` file; `--set` and the explicit options apply on top of it. Its
first comment lines are `# summary: ONE LINE` (what `noisyseg recipes` prints) and
`# needs: KEY, ...` (configuration fields the user must give, such as `data`; training refuses
to start without them), then free comments on what the recipe expects of the data and where each
value comes from.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

SUFFIX = ".yaml"


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    needs: tuple[str, ...]
    path: Path


def recipe_names() -> list[str]:
    return sorted(
        entry.name.removesuffix(SUFFIX) for entry in resources.files(__name__).iterdir() if entry.name.endswith(SUFFIX)
    )


def read_recipe(name: str) -> Recipe:
    """The recipe `name`, or ValueError listing the known ones."""
    names = recipe_names()
    if name not in names:
        raise ValueError(f"unknown recipe {name!r}; known recipes: {', '.join(names)} (noisyseg recipes lists them)")
    path = Path(str(resources.files(__name__) / f"{name}{SUFFIX}"))
    header: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        key, sep, value = line.removeprefix("#").partition(":")
        if not line.startswith("#") or not sep:
            break
        header[key.strip()] = value.strip()
    needs = tuple(n.strip() for n in header.get("needs", "").split(",") if n.strip())
    return Recipe(name, header.get("summary", ""), needs, path)


def check_needs(recipe: Recipe, config: Any) -> None:
    """Refuse a configuration that leaves a field the recipe needs empty."""
    for dotted in recipe.needs:
        node = config
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else getattr(node, part, None)
        if node in (None, "", [], {}):
            raise ValueError(
                f"recipe {recipe.name} needs {dotted} (give it with --set {dotted}=VALUE "
                f"or the matching option; see the comments in {recipe.path})"
            )


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "recipes", help="list the papers' ready configurations (noisyseg train --recipe NAME)"
    )
    parser.set_defaults(func=run_recipes)


def run_recipes(args: argparse.Namespace) -> int:
    for name in recipe_names():
        recipe = read_recipe(name)
        needs = f" (needs {', '.join(recipe.needs)})" if recipe.needs else ""
        print(f"{name}: {recipe.summary}{needs}")
    return 0
