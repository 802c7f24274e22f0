"""One module per architecture family; importing this package registers them all."""

from precompute_cli.recipes import absolute, llama  # noqa: F401
from precompute_cli.recipes.base import REGISTRY, Recipe, RuntimePatch, recipe_for, supported

__all__ = ["REGISTRY", "Recipe", "RuntimePatch", "recipe_for", "supported"]
