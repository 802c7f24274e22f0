"""One module per architecture family, each registering its model types; importing this package imports them all."""

import importlib
import pkgutil

from precompute_cli.recipes.base import REGISTRY, Recipe, RuntimePatch, recipe_for, supported

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["REGISTRY", "Recipe", "RuntimePatch", "recipe_for", "supported"]
