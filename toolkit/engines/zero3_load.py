"""ZeRO-3 without a whole model on any rank: partitioned construction and partitioned weight loading.

DeepSpeed partitions a model at `deepspeed.initialize`, but a model built the ordinary way is whole on
every rank first (a 70B model in bf16 is 140 GB per process before ZeRO-3 gets to shard it). Here the
model is built under `deepspeed.zero.Init` (transformers' `from_pretrained` does so while an
`HfDeepSpeedConfig` is alive): each module's parameters are partitioned as soon as the module exists,
and only rank 0 reads the checkpoint, copying it in one module at a time into parameters gathered for
that module alone. The previous stage's merged weights are loaded the same way (`load_partitioned`).
What a rank holds at the peak of a load is its partition plus one module gathered whole.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from toolkit.errors import CheckpointError


@contextlib.contextmanager
def zero3_construction(ds_config: dict) -> Iterator[Callable[[list[nn.Parameter]], contextlib.AbstractContextManager]]:
    """While open, transformers builds models partitioned (zero.Init) and loads their weights from rank 0 only.

    Yields the gatherer for code that needs a full parameter meanwhile (the frozen copy of a tied head).
    The marker is removed on leaving, so a later `from_pretrained` in this process (an unsharded rebuild
    on rank 0 at the end of a stage, an export) loads whole as usual."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    marker = HfDeepSpeedConfig(ds_config)  # transformers keeps a weak reference: alive while this context is
    try:
        yield lambda params: deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    finally:
        unset_hf_deepspeed_config()
        del marker


def load_partitioned(module: nn.Module, files: list[Path], *, rank: int, source: Path) -> None:
    """Copy safetensors `files` (a backbone's state dict) into a ZeRO-3-partitioned `module`.

    Names and shapes are checked on every rank first, from the files' headers (an error raised by rank
    0 alone inside a gather would leave the other ranks waiting in it). Then, module by module, every
    rank gathers that module's own parameters, rank 0 fills them from the memory-mapped files, and
    DeepSpeed re-partitions them from rank 0's values on leaving the gather. Buffers are not partitioned:
    every rank reads its own."""
    import deepspeed
    from safetensors import safe_open

    with contextlib.ExitStack() as stack:
        handles = {}
        for file in files:
            handle = stack.enter_context(safe_open(str(file), framework="pt"))
            handles.update({key: handle for key in handle.keys()})
        params = dict(module.named_parameters())
        buffers = {name: b for name, b in module.named_buffers() if name in module.state_dict()}
        expected = set(params) | set(buffers)
        missing, unexpected = sorted(expected - set(handles)), sorted(set(handles) - expected)
        if missing or unexpected:
            raise CheckpointError(f"{source}: its backbone tensors differ from the model's (missing {missing[:3]}, "
                                  f"unexpected {unexpected[:3]})")
        for name, p in params.items():
            want = tuple(getattr(p, "ds_shape", p.shape))
            got = tuple(handles[name].get_slice(name).get_shape())
            if got != want:
                raise CheckpointError(f"{source}: {name} has shape {list(got)}, the model's is {list(want)}")
        with torch.no_grad():
            for prefix, sub in module.named_modules():
                own = [(f"{prefix}.{n}" if prefix else n, p) for n, p in sub.named_parameters(recurse=False)]
                if not own:
                    continue
                with deepspeed.zero.GatheredParameters([p for _, p in own], modifier_rank=0):
                    if rank == 0:
                        for name, p in own:
                            p.copy_(handles[name].get_tensor(name))
            for name, buffer in buffers.items():
                buffer.copy_(handles[name].get_tensor(name))
