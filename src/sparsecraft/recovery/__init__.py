"""Recovery fine-tuning of sparse models: mask-preserving training with distillation, and gradual pruning.

Light to import: the training loop (accelerate, transformers' schedulers) loads only when `finetune` runs.
"""

from __future__ import annotations

from .config import FinetuneConfig, make_config


def finetune(*args, **kwargs):
    """See `sparsecraft.recovery.trainer.finetune`."""
    from .trainer import finetune as run

    return run(*args, **kwargs)


finetune.__doc__ = "Fine-tune a sparse student with its mask kept (or pruned gradually); see recovery.trainer."

__all__ = ["FinetuneConfig", "finetune", "make_config"]
