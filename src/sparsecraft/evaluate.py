"""Perplexity over non-overlapping windows and sparsity accounting."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .calibrate import model_device
from .models import find_blocks, is_prunable, model_logits, weight_matrix
from .moe import expert_matrices, is_fused_experts


def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, progress: bool = True) -> float:
    """exp(mean next-token NLL) over all predicted tokens of `windows` ([count, seqlen] token ids)."""
    from tqdm.auto import tqdm

    device = model_device(model)
    total_nll, total_tokens = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for ids in tqdm(windows.split(batch_size), desc="perplexity", disable=not progress, unit="batch"):
            ids = ids.to(device)
            logits = model_logits(model, ids)[:, :-1].float()
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
            total_nll += float(nll)
            total_tokens += ids[:, 1:].numel()
    model.train(was_training)
    return math.exp(total_nll / total_tokens)


def layer_sparsity(model: nn.Module, in_blocks_only: bool = True) -> dict[str, dict]:
    """Zeros per prunable layer (inside the transformer blocks unless `in_blocks_only` is False)."""
    _, blocks = find_blocks(model)
    inside = {id(m) for b in blocks for m in b.modules()} if in_blocks_only else None
    out = {}
    for name, module in model.named_modules():
        if inside is not None and id(module) not in inside:
            continue
        if is_prunable(module):
            matrices = [(name, weight_matrix(module))]
        elif is_fused_experts(module):  # named as the per-expert layers sparsecraft prunes them as
            matrices = [(f"{name}.{suffix}", w) for suffix, w in expert_matrices(module)]
        else:
            continue
        for layer, w in matrices:
            zeros = int((w == 0).sum())
            out[layer] = {"shape": list(w.shape), "zeros": zeros, "sparsity": zeros / w.numel()}
    return out


def overall_sparsity(layers: dict[str, dict]) -> float:
    total = sum(v["shape"][0] * v["shape"][1] for v in layers.values())
    return sum(v["zeros"] for v in layers.values()) / max(total, 1)
