"""Input-channel permutation for N:M sparsity (RIA, Zhang et al. 2024; Pool & Yu 2021, "Channel Permutations
for N:M Sparsity").

An N:M mask keeps N weights in every group of M *consecutive* input columns. Which columns share a group is
arbitrary, so reordering the input channels first lets important weights that would have competed inside one
group land in different groups. The permutation is chosen to maximise the importance the N:M mask keeps,
summed over all rows.

**Where the permutation goes.** A permutation of a layer's input channels is only free if whatever produces
those channels can produce them in the new order. sparsecraft folds it *exactly* into the producer layers where
the producer's outputs reach the consumer through elementwise operations only:

* LLaMA / Mistral / Qwen / Gemma MLPs: ``down_proj`` columns, with ``gate_proj`` and ``up_proj`` rows
  (``act(gate(x)) * up(x)`` is elementwise),
* OPT / Phi: ``fc2`` columns with ``fc1`` rows (and bias), GPT-2: ``mlp.c_proj`` with ``mlp.c_fc``,
  GPT-NeoX / Falcon: ``dense_4h_to_h`` with ``dense_h_to_4h``.
* Mixture-of-experts models' routed experts (split per expert, moe.py): ``experts.E.down_proj`` columns with
  the matching rows of ``experts.E.gate_up_proj`` (both halves when gate and up are concatenated, both entries
  of each pair when they are interleaved, as in GPT-OSS) or ``experts.E.up_proj``.

The saved model has the same architecture and computes the same function as before pruning (up to float
summation order); its N:M groups are consecutive, so it stays hardware-2:4. Layers whose inputs come from the
residual stream (q/k/v, gate/up) or from attention (o_proj) are not permuted: a permutation there would have to
be applied to the whole residual stream, or be carried at run time.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import ConfigError
from .models import weight_matrix
from .moe import Expert

# consumer leaf name -> producer leaf names (siblings under the same parent module)
FOLDS: dict[str, tuple[str, ...]] = {
    "down_proj": ("gate_proj", "up_proj"),
    "fc2": ("fc1",),
    "c_proj": ("c_fc",),  # GPT-2's mlp.c_proj; attn.c_proj has no c_fc sibling and is left alone
    "dense_4h_to_h": ("dense_h_to_4h",),
    "w2": ("w1", "w3"),  # Mixtral-style experts: w2(act(w1 x) * w3 x)
}

ASSIGN_WINDOW = 256  # groups re-assigned jointly in one linear assignment (bounds time and memory)


def producers(modules: dict[str, nn.Module], consumer: str) -> list[tuple[str, nn.Module]] | None:
    """The layers whose output rows feed `consumer`'s input columns elementwise, or None if there are none
    (then the consumer cannot be permuted exactly)."""
    parent, _, leaf = consumer.rpartition(".")
    expert = modules.get(parent)
    if isinstance(expert, Expert) and leaf == "down_proj":
        up = getattr(expert, expert.up_name)
        cols = weight_matrix(modules[consumer]).shape[1]
        rows = weight_matrix(up).shape[0]
        return [(f"{parent}.{expert.up_name}", up)] if rows == cols * (2 if expert.gated else 1) else None
    names = FOLDS.get(leaf)
    if not names:
        return None
    found = []
    for name in names:
        full = f"{parent}.{name}" if parent else name
        module = modules.get(full)
        if module is None or not hasattr(module, "weight"):
            return None
        found.append((full, module))
    cols = weight_matrix(modules[consumer]).shape[1]
    if any(weight_matrix(m).shape[0] != cols for _, m in found):
        return None
    return found


def kept_importance(scores: torch.Tensor, order: torch.Tensor, n: int, m: int) -> float:
    """Sum over rows and groups of the n largest scores of each group of m, columns taken in `order`."""
    rows = scores.shape[0]
    grouped = scores[:, order].reshape(rows, -1, m)
    return float(grouped.topk(n, dim=-1).values.sum(dtype=torch.float64))


def nm_permutation(scores: torch.Tensor, n: int, m: int, rounds: int = 2, seed: int = 0) -> torch.Tensor:
    """A column order maximising the importance an n:m mask keeps: ``scores[:, perm]`` is what gets grouped.

    Start: channels sorted by total importance and dealt to the groups in a snake order (every group gets a mix
    of strong and weak channels). Then, for each slot position k of the groups in turn, take the k-th channel
    out of every group and re-assign those channels to the groups optimally (a linear assignment: with the other
    m-1 channels fixed, adding channel c with score v to a group whose n-th largest fixed score is t gains
    relu(v - t) in that row). Each step can only increase the kept importance, and the result is never worse
    than the original order (which is returned if it is). Large layers are assigned in windows of
    ASSIGN_WINDOW groups.
    """
    from scipy.optimize import linear_sum_assignment

    rows, cols = scores.shape
    if cols % m:
        raise ConfigError(f"cannot permute {cols} columns into groups of {m}")
    groups = cols // m
    scores = scores.float()
    order = scores.sum(0).argsort(descending=True)
    slots = torch.empty(groups, m, dtype=torch.long)
    for k in range(m):
        chunk = order[k * groups:(k + 1) * groups]
        slots[:, k] = chunk.flip(0) if k % 2 else chunk
    if n >= m or groups < 2:
        return torch.arange(cols)
    gen = torch.Generator().manual_seed(seed)
    best = kept_importance(scores, slots.reshape(-1), n, m)
    for _ in range(rounds):
        for k in range(m):
            others = torch.cat([slots[:, :k], slots[:, k + 1:]], dim=1)  # [groups, m-1]
            fixed = scores[:, others.reshape(-1)].reshape(rows, groups, m - 1)
            threshold = fixed.topk(n, dim=-1).values[..., -1]  # n-th largest fixed score, [rows, groups]
            moving = slots[:, k].clone()
            windows = torch.randperm(groups, generator=gen).split(ASSIGN_WINDOW)
            for window in windows:
                cand = scores[:, moving[window]]  # [rows, w]: the channels in play
                thr = threshold[:, window]  # [rows, w]: the groups in play
                gain = torch.zeros(len(window), len(window), dtype=torch.float64)
                for r in range(0, rows, 512):  # gain[c, g] = sum_r relu(cand[r, c] - thr[r, g])
                    gain += (cand[r:r + 512].unsqueeze(2) - thr[r:r + 512].unsqueeze(1)).clamp_min(0).sum(0)
                chan, grp = linear_sum_assignment(gain.numpy(), maximize=True)
                slots[window[torch.as_tensor(grp)], k] = moving[window[torch.as_tensor(chan)]]
        value = kept_importance(scores, slots.reshape(-1), n, m)
        if value <= best * (1 + 1e-6):
            best = max(best, value)
            break
        best = value
    identity = torch.arange(cols)
    if kept_importance(scores, identity, n, m) >= best:  # never worse than leaving the order alone
        return identity
    return slots.reshape(-1)


def permute_rows(module: nn.Module, perm: torch.Tensor) -> None:
    """Reorder a layer's output features (weight rows, bias) in place."""
    with torch.no_grad():
        w = weight_matrix(module)
        w.copy_(w[perm.to(w.device)].clone())
        bias = getattr(module, "bias", None)
        if bias is not None:
            bias.copy_(bias[perm.to(bias.device)].clone())


def permute_columns(module: nn.Module, perm: torch.Tensor) -> None:
    """Reorder a layer's input features (weight columns) in place."""
    with torch.no_grad():
        w = weight_matrix(module)
        w.copy_(w[:, perm.to(w.device)].clone())


def permute_stats(stats, perm: torch.Tensor) -> None:
    """Reorder collected input statistics to match permuted input channels."""
    if stats is None:
        return
    p = perm.to(stats.sum.device)
    stats.sum = stats.sum[p]
    stats.sq = stats.sq[p]
    for name in ("xtx", "dtx"):
        mat = getattr(stats, name)
        if mat is not None:
            setattr(stats, name, mat[p][:, p].contiguous())


def fold(modules: dict[str, nn.Module], consumer: str, perm: torch.Tensor) -> list[str]:
    """Permute `consumer`'s input columns and its producers' output rows by `perm` (the function is unchanged).
    Returns the producers' names."""
    found = producers(modules, consumer)
    if found is None:
        raise ConfigError(f"{consumer} has no producer layer to fold a permutation into")
    for _, module in found:
        permute_rows(module, _producer_rows(modules, consumer, perm))
    permute_columns(modules[consumer], perm)
    return [name for name, _ in found]


def _producer_rows(modules: dict[str, nn.Module], consumer: str, perm: torch.Tensor) -> torch.Tensor:
    """The producer's row order for the consumer's column order `perm`: `perm` itself, or for an expert's fused
    gate-and-up projection the same order applied to gate and up rows alike."""
    expert = modules.get(consumer.rpartition(".")[0])
    if not isinstance(expert, Expert) or not expert.gated:
        return perm
    if expert.gated == "interleaved":  # rows gate0, up0, gate1, up1, ...
        return torch.stack([2 * perm, 2 * perm + 1], dim=1).reshape(-1)
    return torch.cat([perm, perm + perm.numel()])  # rows [gate; up]


def permutation_scores(method: str, weight: torch.Tensor, stats) -> torch.Tensor:
    """The importance the permutation maximises: the method's own criterion where it has one (RIA, Wanda,
    magnitude); for SparseGPT, the diagonal-Hessian OBS saliency w_ij^2 ||X_j||^2."""
    if stats is None or method == "magnitude":
        return weight.abs()
    if method == "ria":
        from .criteria.ria import ria_scores

        return ria_scores(weight, stats)
    wanda = weight.abs() * stats.norms.to(weight.device).unsqueeze(0)
    return wanda if method == "wanda" else wanda * wanda
