"""Keeping a sparsity mask exactly through training.

A MaskManager holds one boolean *keep* mask per targeted weight. Around every optimizer step it
- zeroes the gradients at masked entries (so they get exactly zero gradient, hence exactly zero Adam moments,
  whose update is then exactly zero too), and
- zeroes the masked weights again after the step (a guard: no optimizer can revive a pruned weight).
When a mask changes (gradual pruning) the optimizer's per-entry state (exp_avg, exp_avg_sq, momentum, ...) is
zeroed at the newly masked entries, so a pruned weight carries no history.

Masks are elementwise on whatever tensor the parameter is (a full matrix, or the local shard under FSDP), so
they work unchanged on wrapped models as long as they are captured from the same parameters they are
applied to.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..models import Target

_WRAPPER_PREFIXES = ("module.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def _strip_wrappers(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (a collective: every process must call it), else the tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class MaskManager:
    def __init__(self, params: dict[str, nn.Parameter], masks: dict[str, torch.Tensor]):
        self.params = params
        self.masks = masks
        self._pruned: dict[str, torch.Tensor] = {}

    def pruned(self, name: str) -> torch.Tensor:
        """The complement of the keep mask (cached): masked_fill with it also clears NaN/inf, which a
        multiplication by zero would not."""
        if name not in self._pruned:
            self._pruned[name] = ~self.masks[name]
        return self._pruned[name]

    @classmethod
    def from_targets(cls, targets: list[Target], dense: bool = False) -> MaskManager:
        """Masks of the targets' weights: their non-zeros (or all-True with `dense`, for gradual pruning)."""
        params = {t.name: t.module.weight for t in targets}
        masks = {name: torch.ones_like(p, dtype=torch.bool) if dense else (p.detach() != 0)
                 for name, p in params.items()}
        return cls(params, masks)

    def rebind(self, named_parameters: dict[str, nn.Parameter]) -> None:
        """Follow parameters that a wrapper replaced (FSDP2 turns them into DTensors): look each weight up by its
        name in the wrapped model (wrapper prefixes removed) and shard its mask like the new parameter."""
        clean = {_strip_wrappers(n): p for n, p in named_parameters.items()}
        for name, old in list(self.params.items()):
            new = clean.get(f"{name}.weight")
            if new is None or new is old:
                continue
            mask = self.masks[name]
            if hasattr(new, "device_mesh") and hasattr(new, "placements"):  # a DTensor (FSDP2)
                from torch.distributed.tensor import distribute_tensor

                mask = distribute_tensor(mask.to(new.device), new.device_mesh, new.placements)
            elif new.shape != mask.shape:
                raise ConfigError(f"{name}.weight was reshaped by the wrapper ({tuple(mask.shape)} -> "
                                  f"{tuple(new.shape)}, FSDP1 flat parameters), so its mask cannot follow it: use DDP "
                                  "or FSDP2 (accelerate's fsdp_version: 2)")
            self.params[name], self.masks[name] = new, mask
            self._pruned.pop(name, None)

    def to(self, device: torch.device) -> MaskManager:
        self.masks = {name: m.to(device) for name, m in self.masks.items()}
        self._pruned.clear()
        return self

    def sparsity(self) -> float:
        """Fraction of masked (pruned) entries over every managed weight."""
        total = sum(m.numel() for m in self.masks.values())
        return sum(int((~_full(m)).sum()) for m in self.masks.values()) / max(total, 1)

    def weight_sparsity(self) -> float:
        """Fraction of exact zeros in the managed weights."""
        total = sum(p.numel() for p in self.params.values())
        return sum(int((_full(p.detach()) == 0).sum()) for p in self.params.values()) / max(total, 1)

    @torch.no_grad()
    def mask_gradients(self) -> None:
        for name, param in self.params.items():
            if param.grad is not None:
                param.grad.masked_fill_(self.pruned(name), 0.0)

    @torch.no_grad()
    def apply(self) -> None:
        """Zero every masked weight."""
        for name, param in self.params.items():
            param.masked_fill_(self.pruned(name), 0.0)

    @torch.no_grad()
    def zero_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Zero the optimizer's per-entry state (tensors shaped like the weight) at masked entries."""
        state = getattr(optimizer, "state", {})
        for name, param in self.params.items():
            for value in state.get(param, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == param.shape:
                    value.masked_fill_(self.pruned(name), 0.0)

    def update(self, new_masks: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer | None = None) -> None:
        """Replace masks (pruning more entries), zero the newly masked weights and their optimizer state."""
        for name, mask in new_masks.items():
            self.masks[name] = mask.to(device=self.masks[name].device, dtype=torch.bool)
            self._pruned.pop(name, None)
        self.apply()
        if optimizer is not None:
            self.zero_optimizer_state(optimizer)

    def check(self) -> list[str]:
        """Names of weights with a non-zero at a masked entry (empty when the mask holds)."""
        return [name for name, p in self.params.items()
                if bool((_full(p.detach())[_full(self.pruned(name))] != 0).any())]

    # checkpointing (accelerate's register_for_checkpointing calls these)
    def state_dict(self) -> dict:
        return {"masks": {name: _full(m).cpu() for name, m in self.masks.items()}}

    def load_state_dict(self, state: dict) -> None:
        saved = state["masks"]
        if set(saved) != set(self.masks):
            raise ValueError("the checkpoint's masks are for other layers than this model's targets")
        for name, mask in saved.items():
            current = self.masks[name]
            mask = mask.to(current.device, torch.bool)
            if hasattr(current, "device_mesh"):  # sharded like the parameter (FSDP2)
                from torch.distributed.tensor import distribute_tensor

                mask = distribute_tensor(mask, current.device_mesh, current.placements)
            self.masks[name] = mask
        self._pruned.clear()
