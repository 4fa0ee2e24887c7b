"""Training batches: the training part of a data source packed into windows, served in a seeded order that is
a pure function of the step, so a resumed run sees exactly the batches the uninterrupted one would."""

from __future__ import annotations

import torch

from ..errors import DataError


def pack(tokens: torch.Tensor, seqlen: int) -> torch.Tensor:
    """Sequence packing: the token stream (documents already joined) cut into consecutive windows of `seqlen`
    tokens, every token used once; the trailing partial window is dropped. [count, seqlen]."""
    count = tokens.numel() // seqlen
    if count == 0:
        raise DataError(f"the training text has {tokens.numel()} tokens, shorter than one window of {seqlen}: "
                        "give more text or a smaller --seqlen")
    return tokens[: count * seqlen].reshape(count, seqlen)


class WindowStream:
    """Micro-batch `micro` of optimizer step `step` for process `rank` of `world`: consecutive slices of an endless
    stream of epochs, each a seeded permutation of the windows. Every process sees different windows; one
    optimizer step consumes batch_size x world x grad_accum windows."""

    def __init__(self, windows: torch.Tensor, batch_size: int, grad_accum: int, seed: int, world: int = 1,
                 rank: int = 0):
        self.windows = windows
        self.batch_size, self.grad_accum, self.seed = batch_size, grad_accum, seed
        self.world, self.rank = world, rank
        needed = batch_size * world
        if windows.shape[0] < needed:
            raise DataError(
                f"the training data holds {windows.shape[0]} windows of {windows.shape[1]} tokens, fewer than one "
                f"batch of {needed} ({batch_size} per process x {world} processes): give more text, or lower "
                "--batch-size or --seqlen"
            )
        self._perms: dict[int, torch.Tensor] = {}

    @property
    def windows_per_step(self) -> int:
        return self.batch_size * self.world * self.grad_accum

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.windows.shape[0], generator=gen)}
        return self._perms[epoch]

    def indices(self, step: int, micro: int) -> list[int]:
        n = self.windows.shape[0]
        first = ((step * self.grad_accum + micro) * self.world + self.rank) * self.batch_size
        return [int(self._perm(p // n)[p % n]) for p in range(first, first + self.batch_size)]

    def batch(self, step: int, micro: int) -> torch.Tensor:
        return self.windows[self.indices(step, micro)]

    def epochs(self, steps: int) -> float:
        return steps * self.windows_per_step / self.windows.shape[0]
