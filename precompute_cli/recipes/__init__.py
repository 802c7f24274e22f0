"""One module per architecture family; importing this package registers them all."""

from precompute_cli.recipes import (  # noqa: F401
    absolute,
    bloom,
    cohere,
    falcon,
    gemma,
    gpt_neox,
    gpt_oss,
    gptj,
    llama,
    mla,
    mpt,
    olmo,
    phi,
    phi3,
    stablelm,
)
from precompute_cli.recipes.base import REGISTRY, Recipe, RuntimePatch, recipe_for, supported

__all__ = ["REGISTRY", "Recipe", "RuntimePatch", "recipe_for", "supported"]
