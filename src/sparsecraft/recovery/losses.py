"""Losses of recovery fine-tuning: causal-LM cross-entropy, logit distillation (KL at a temperature) and
SquareHead (Kurtic et al. 2023): per transformer block, the student's output MSE against the teacher's,
normalised by the teacher output's mean square, summed over blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..calibrate import block_output


def causal_lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: logits [B, L, V] at position t predict ids[:, t + 1]."""
    pred = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    return F.cross_entropy(pred, ids[:, 1:].reshape(-1))


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
            chunk: int = 1024) -> torch.Tensor:
    """T^2 x mean over tokens of KL(p_teacher || p_student) with both distributions softened by T.

    Computed over chunks of `chunk` tokens, each recomputed in the backward pass (activation checkpointing), so
    the float32 softmaxes over a large vocabulary are never kept for the whole batch; the result equals the
    unchunked mean."""
    from torch.utils.checkpoint import checkpoint

    vocab = student_logits.shape[-1]
    s = student_logits.reshape(-1, vocab)
    t = teacher_logits.reshape(-1, vocab).detach()
    total = s.new_zeros((), dtype=torch.float32)
    for start in range(0, s.shape[0], chunk):
        part_s, part_t = s[start:start + chunk], t[start:start + chunk]
        if part_s.requires_grad and s.shape[0] > chunk:
            total = total + checkpoint(_kl_sum, part_s, part_t, temperature, use_reentrant=False)
        else:
            total = total + _kl_sum(part_s, part_t, temperature)
    return total * (temperature ** 2) / s.shape[0]


def _kl_sum(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    log_ps = F.log_softmax(student.float() / temperature, dim=-1)
    log_pt = F.log_softmax(teacher.float() / temperature, dim=-1)
    return F.kl_div(log_ps, log_pt, reduction="sum", log_target=True)


def squarehead_loss(student_hidden: list[torch.Tensor], teacher_hidden: list[torch.Tensor],
                    eps: float = 1e-12) -> torch.Tensor:
    """Sum over blocks of MSE(student_l, teacher_l) / MSE(teacher_l, 0) (means over every element)."""
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(f"{len(student_hidden)} student blocks vs {len(teacher_hidden)} teacher blocks")
    total = student_hidden[0].new_zeros((), dtype=torch.float32)
    for hs, ht in zip(student_hidden, teacher_hidden):
        ht = ht.detach().float()
        total = total + F.mse_loss(hs.float(), ht) / ht.pow(2).mean().clamp_min(eps)
    return total


class BlockOutputs:
    """Forward hooks that keep each transformer block's output hidden states of the latest forward pass.

    Keyed by block index, so a recomputation (activation checkpointing) overwrites instead of appending."""

    def __init__(self, blocks: list[nn.Module]):
        self.count = len(blocks)
        self.outputs: dict[int, torch.Tensor] = {}
        self.enabled = True
        self.handles = [block.register_forward_hook(self._hook(i)) for i, block in enumerate(blocks)]

    def _hook(self, index: int):
        def hook(module, args, output):
            if self.enabled:
                self.outputs[index] = block_output(output)

        return hook

    def take(self) -> list[torch.Tensor]:
        """The outputs of every block, in order, and forget them."""
        missing = [i for i in range(self.count) if i not in self.outputs]
        if missing:
            raise RuntimeError(f"blocks {missing} produced no output in the last forward pass")
        out = [self.outputs[i] for i in range(self.count)]
        self.outputs.clear()
        return out

    def clear(self) -> None:
        self.outputs.clear()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.outputs.clear()
