"""localmoe: quantised local inference for Mixture-of-Experts language models."""
from .errors import LocalMoeError
from .model import Model, load

__all__ = ["load", "Model", "LocalMoeError"]
__version__ = "0.1.0"
