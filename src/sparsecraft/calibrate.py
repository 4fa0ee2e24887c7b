"""The sequential block runner: the one place that catches transformer-block inputs.

Calibration runs the model one block at a time: the inputs of block 0 are caught once, then for each
block the statistics its layers need are collected by forward hooks, the caller prunes (or inspects)
the block, and the block's outputs *after* that become the next block's inputs. Only one block's
activations are alive at any time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .models import Target, call_model, weight_matrix


class _StopForward(Exception):
    """Raised by the capture hook to stop the model's forward at the first block."""


def _to(obj, device: torch.device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@dataclass
class BlockInputs:
    """Per calibration batch: the block's positional args and keyword args, as the model passed them."""

    args: list[tuple]
    kwargs: list[dict]

    def replace_hidden(self, outputs: list[torch.Tensor]) -> None:
        """Make `outputs` the hidden states fed to the next block."""
        for i, out in enumerate(outputs):
            if self.args[i]:
                self.args[i] = (out, *self.args[i][1:])
            else:
                self.kwargs[i] = {**self.kwargs[i], "hidden_states": out}


def capture_block_inputs(model: nn.Module, first_block: nn.Module, batches: Iterable[torch.Tensor],
                         device: torch.device) -> BlockInputs:
    """Run the model on each batch of token ids until `first_block` and keep what that block receives."""
    caught = BlockInputs([], [])

    def hook(module, args, kwargs):
        caught.args.append(_to(args, device))
        caught.kwargs.append(_to(kwargs, device))
        raise _StopForward

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    where = model_device(model)
    try:
        with torch.no_grad():
            for ids in batches:
                try:
                    call_model(model, ids.to(where))
                except _StopForward:
                    pass
    finally:
        handle.remove()
    return caught


def block_output(out) -> torch.Tensor:
    """Blocks return a tensor, or a tuple/ModelOutput whose first entry is the hidden states."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    return out[0] if hasattr(out, "__getitem__") else out


def run_block(block: nn.Module, inputs: BlockInputs) -> list[torch.Tensor]:
    with torch.no_grad():
        return [block_output(block(*a, **k)) for a, k in zip(inputs.args, inputs.kwargs)]


StatsFactory = Callable[[Target], object | None]


class _Recorder:
    """Forward hooks on the targets of one block. In 'record' mode they keep each target's input (from the
    dense stream); in 'collect' mode they feed the collectors, paired with the recorded dense input when
    there is one (for cross-covariances)."""

    def __init__(self, targets: list[Target], factory: StatsFactory):
        self.stats: dict[str, object] = {}
        self.recorded: dict[str, torch.Tensor] = {}
        self.mode = "collect"
        self.handles = []
        for target in targets:
            collector = factory(target)
            if collector is None:
                continue
            self.stats[target.name] = collector
            self.handles.append(target.module.register_forward_hook(self._hook(target.name, collector)))

    def _hook(self, name: str, collector):
        def hook(module, args, output):
            x = args[0].detach()
            if self.mode == "record":
                self.recorded[name] = x
            elif name in self.recorded:
                collector.add_batch(x, dense=self.recorded.pop(name))
            else:
                collector.add_batch(x)

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.recorded.clear()


def columns(target: Target) -> int:
    return weight_matrix(target.module).shape[1]


def run_sequential(
    model: nn.Module,
    blocks: list[nn.Module],
    batches: list[torch.Tensor],
    targets: list[Target],
    factory: StatsFactory,
    on_block: Callable[[int, list[Target], dict[str, object]], None],
    device: torch.device,
    progress: bool = True,
    modifies: bool = True,
    desc: str = "calibrating blocks",
    dense_stream: bool = False,
) -> None:
    """For each block: collect statistics of its targets on its inputs, call `on_block`, then feed the
    block's new outputs to the next block. Targets outside the blocks are handled last, from one
    forward pass of the whole (already processed) model. With `modifies=False` (`on_block` only reads),
    statistics and outputs come from a single pass per block.

    With `dense_stream`, the dense model's hidden states are carried alongside the pruned ones: each
    block first runs (still dense) on the dense stream, and the collectors receive every target's input
    from both streams, batch by batch (`add_batch(x, dense=x_dense)`)."""
    from tqdm.auto import tqdm

    by_block: dict[int, list[Target]] = {}
    for t in targets:
        if t.block is not None:
            by_block.setdefault(t.block, []).append(t)
    outside = [t for t in targets if t.block is None]
    last = max(by_block, default=-1)
    if last >= 0:
        inputs = capture_block_inputs(model, blocks[0], batches, device)
        dense = BlockInputs(list(inputs.args), list(inputs.kwargs)) if dense_stream else None
        for index in tqdm(range(last + 1), desc=desc, disable=not progress, unit="block"):
            block = blocks[index]
            home = model_device(block)
            block.to(device)
            block_targets = by_block.get(index, [])
            recorder = _Recorder(block_targets, factory)
            outputs, dense_outputs = (None if modifies else []), []
            try:
                with torch.no_grad():
                    for i, (a, k) in enumerate(zip(inputs.args, inputs.kwargs)):
                        if dense is not None:
                            recorder.mode = "record"
                            dense_outputs.append(block_output(block(*dense.args[i], **dense.kwargs[i])))
                            recorder.mode = "collect"
                        if recorder.stats:
                            out = block_output(block(*a, **k))
                            if not modifies:
                                outputs.append(out)
                            del out
            finally:
                recorder.remove()
            on_block(index, block_targets, recorder.stats)
            if index < last:
                if modifies or not outputs:
                    outputs = run_block(block, inputs)
                inputs.replace_hidden(outputs)
                if dense is not None:
                    dense.replace_hidden(dense_outputs)
            del outputs, dense_outputs
            block.to(home)
        del inputs, dense
    if outside:
        recorder = _Recorder(outside, factory)
        where = model_device(model)
        try:
            with torch.no_grad():
                for ids in tqdm(batches, desc=f"{desc} (outer layers)", disable=not progress or not recorder.stats):
                    if recorder.stats:
                        call_model(model, ids.to(where))
        finally:
            recorder.remove()
        on_block(-1, outside, recorder.stats)
