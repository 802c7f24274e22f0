"""precompute-cli: fold layer 0 of a transformer into a per-token table."""

__version__ = "0.1.0"


def load_model(*args, **kwargs):
    """Load a converted checkpoint as a transformers model (needs the `runtime` extra)."""
    from precompute_cli.runtime import load_model as _load_model

    return _load_model(*args, **kwargs)


__all__ = ["__version__", "load_model"]
