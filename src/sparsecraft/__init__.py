"""sparsecraft: make neural networks sparse, smaller and faster without losing their quality."""

__version__ = "0.1.0"

from .api import evaluate, load, prune, save  # noqa: E402
from .data import load_text  # noqa: E402
from .errors import SparsecraftError  # noqa: E402
from .models import load_model, select_targets  # noqa: E402
from .patterns import Pattern  # noqa: E402
from .recipe import Recipe  # noqa: E402
from .registry import method_names  # noqa: E402

__all__ = ["prune", "evaluate", "save", "load", "load_model", "load_text", "select_targets", "Pattern",
           "Recipe", "SparsecraftError", "method_names", "__version__"]
