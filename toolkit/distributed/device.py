"""Where a process's tensors live: `device: auto | cpu | cuda`, resolved once.

auto = this rank's GPU (`cuda:LOCAL_RANK`) when CUDA is present, else the CPU. Asking for CUDA on a
machine without it is a configuration error named at once, before any weight is read (a CPU torch
build would otherwise train silently on the CPU, or fail deep inside the first step).
"""

from __future__ import annotations

import os

import torch

from toolkit.config import ConfigError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(requested: str, *, field: str = "device") -> torch.device:
    if requested not in DEVICES:
        raise ConfigError(f"{field}: must be one of {', '.join(DEVICES)}, got {requested!r}")
    has_cuda = torch.cuda.is_available()
    if requested == "cuda" and not has_cuda:
        why = "this torch is a CPU build" if torch.version.cuda is None else "no GPU is visible"
        raise ConfigError(f"{field}=cuda: CUDA is not available here (torch {torch.__version__}: {why}); "
                          f"set {field}: auto or cpu, or install a CUDA build of torch")
    if requested == "cpu" or not has_cuda:
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def resolve_megatron_device(requested: str, *, field: str = "device") -> torch.device:
    """`resolve_device` for megatron-core: on this rank's GPU when CUDA is present; on the CPU only
    where CUDA is absent, since its CPU shims (`megatron_shims`) apply only there."""
    device = resolve_device(requested, field=field)
    if device.type == "cpu" and torch.cuda.is_available():
        raise ConfigError(f"{field}=cpu: megatron-core runs on the GPUs when CUDA is present (its CPU path is for "
                          f"machines without CUDA); set {field}: auto")
    return device
