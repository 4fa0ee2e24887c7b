"""One exception family: every user-facing failure says what was wrong and how to fix it."""


class SparsecraftError(Exception):
    """Base class; the CLI prints its message as one line and exits non-zero."""


class ConfigError(SparsecraftError):
    """A recipe value is invalid (method, pattern, sparsity, sample counts, ...)."""


class ModelError(SparsecraftError):
    """A model cannot be found, loaded, or has nothing to prune."""


class DataError(SparsecraftError):
    """Calibration or evaluation text is missing or too short."""


class OutputError(SparsecraftError):
    """An output path cannot be written (exists without --force, ...)."""


class KernelError(SparsecraftError):
    """The sparse kernels are not built, or were given an input they cannot run (dtype, device, shape)."""


class TrainingError(SparsecraftError):
    """Fine-tuning stopped because it diverged (NaN or exploding loss or weights); nothing was saved."""
