"""sparsecraft: make neural networks sparse, smaller and faster without losing their quality."""

from ._version import __version__
from .activation import activate
from .api import evaluate, export, load, prune, save
from .data import load_text
from .errors import SparsecraftError
from .kernels import densify_model, sparsify_model
from .models import load_model, select_targets
from .patterns import Pattern
from .quantize import fake_quantize_int8, quantize_int8
from .recipe import Recipe
from .recovery import FinetuneConfig, finetune
from .registry import method_names

__all__ = [
    "FinetuneConfig",
    "Pattern",
    "Recipe",
    "SparsecraftError",
    "__version__",
    "activate",
    "densify_model",
    "evaluate",
    "export",
    "fake_quantize_int8",
    "finetune",
    "load",
    "load_model",
    "load_text",
    "method_names",
    "prune",
    "quantize_int8",
    "save",
    "select_targets",
    "sparsify_model",
]
