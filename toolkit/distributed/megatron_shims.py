"""megatron-core on a machine without CUDA: the few patches it needs, in one place.

megatron-core assumes a GPU in a handful of spots that matter for tests and CI on CPU (verified on
megatron-core 0.16.1 + torch 2.13 CPU + gloo). `apply()` patches exactly those, and only when CUDA
is absent; on a GPU machine it does nothing. `check()` fails loudly (naming the patched symbol) when
a megatron upgrade moved or renamed one of them, so a silent no-op shim can never hide behind
"it imported fine". Patched:

- `torch.cuda.current_device()` -> the CPU device (p2p shape buffers, embedding-group all-reduce);
- `torch.cuda.synchronize()` -> no-op (p2p communication);
- the model-parallel RNG tracker -> a CPU-generator tracker (`tensor_parallel.random`), so dropout
  inside TP regions forks a seeded CPU stream as it forks a CUDA stream on GPU, and the CUDA RNG
  get / set of activation recomputation -> no-ops (the CPU state and the tracker are still replayed);
- `transformer.utils.get_default_causal_mask` / `get_sliding_window_causal_mask` -> CPU masks;
- `device="cuda"` literals in `pipeline_parallel.schedules` -> CPU (token counters).

Not shimmed, by design: megatron's optimizer, grad clipping (asserts `torch.cuda.FloatTensor`) and
distributed optimizer (tried with megatron's DistributedDataParallel: `DistributedOptimizer`
allocates `device='cuda'` tensors in `MixedPrecisionOptimizer.__init__`, and past those raises
`TypeError: Wrapped parameters must be one of torch.cuda.FloatTensor, torch.cuda.HalfTensor, or
torch.cuda.BFloat16Tensor. Received torch.FloatTensor` from `_build_model_and_main_param_groups`: a
shim would have to make CPU tensors report a CUDA type). The megatron engine uses torch's AdamW,
its own clipping, and its own ZeRO-1 (toolkit/engines/megatron/dist_optimizer.py) instead.
"""

from __future__ import annotations

import contextlib
import types

import torch

_APPLIED = False
_CPU = torch.device("cpu")


def cuda_absent() -> bool:
    return not torch.cuda.is_available()


class _CpuRngTracker:
    """Named CPU RNG streams with megatron's `CudaRNGStatesTracker` interface (add / fork / states)."""

    def __init__(self, *args, **kwargs) -> None:
        self.reset()

    def is_initialized(self) -> bool:
        return self._is_initialized

    def reset(self) -> None:
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._current = "default-rng"

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_:
            raise RuntimeError(f"rng seed {seed} already exists")
        if name in self.states_:
            raise RuntimeError(f"rng state {name} already exists")
        self._is_initialized = True
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise RuntimeError(f"rng state {name} is not added")
        # As upstream: park the live stream under its name first, so a nested fork (sequence
        # parallelism forks around the whole block, layers fork again) continues it, not a stale copy.
        outer_name, outer = self._current, torch.get_rng_state()
        if outer_name != "default-rng":
            self.states_[outer_name] = outer
        torch.set_rng_state(self.states_[name])
        self._current = name
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(self.states_[outer_name] if outer_name != "default-rng" else outer)
            self._current = outer_name


class _CpuTorch(types.ModuleType):
    """`torch` as seen by one megatron module: factory calls with device="cuda" land on the CPU."""

    _FACTORIES = ("zeros", "ones", "empty", "tensor", "full", "arange")

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name: str):
        attr = getattr(torch, name)
        if name in self._FACTORIES:
            def factory(*args, _fn=attr, **kwargs):
                if str(kwargs.get("device", "")).startswith("cuda"):
                    kwargs["device"] = _CPU
                return _fn(*args, **kwargs)

            return factory
        return attr


def _cpu_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, device=_CPU), diagonal=1).bool()


def _cpu_sliding_window_mask(sq: int, skv: int, window_size) -> torch.Tensor:
    m = torch.ones(sq, skv, dtype=torch.bool, device=_CPU)
    mu = torch.triu(m, diagonal=skv - sq - window_size[0])
    return ~torch.tril(mu, diagonal=skv - sq + window_size[1])


# (module, attribute) pairs apply() replaces; check() asserts each still exists upstream.
_TARGETS = (
    ("megatron.core.tensor_parallel.random", "_CUDA_RNG_STATE_TRACKER"),
    ("megatron.core.tensor_parallel.random", "_CUDA_RNG_STATE_TRACKER_INITIALIZED"),
    ("megatron.core.tensor_parallel.random", "CudaRNGStatesTracker"),
    ("megatron.core.tensor_parallel.random", "_get_cuda_rng_state"),
    ("megatron.core.tensor_parallel.random", "_set_cuda_rng_state"),
    ("megatron.core.transformer.utils", "get_default_causal_mask"),
    ("megatron.core.transformer.utils", "get_sliding_window_causal_mask"),
    ("megatron.core.pipeline_parallel.schedules", "torch"),
    ("megatron.core.pipeline_parallel.p2p_communication", "torch"),
)


def check() -> None:
    """Raise if megatron-core no longer has a symbol these shims replace (an upgrade moved it)."""
    import importlib

    for module_name, attr in _TARGETS:
        module = importlib.import_module(module_name)
        if not hasattr(module, attr):
            raise RuntimeError(
                f"megatron CPU shims: {module_name}.{attr} no longer exists (megatron-core upgrade?); "
                "update toolkit/distributed/megatron_shims.py"
            )


def apply() -> bool:
    """Patch megatron-core for CPU; returns True if patches are active. Idempotent; no-op with CUDA."""
    global _APPLIED
    if not cuda_absent():
        return False
    if _APPLIED:
        return True
    check()
    import megatron.core.pipeline_parallel.schedules as schedules
    import megatron.core.tensor_parallel.random as mrandom
    import megatron.core.transformer.utils as tutils

    torch.cuda.current_device = lambda: _CPU  # type: ignore[assignment]
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    mrandom._CUDA_RNG_STATE_TRACKER = _CpuRngTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    # Activation recomputation saves / restores "all" RNG states: on CPU there is no CUDA one.
    mrandom._get_cuda_rng_state = lambda *a, **k: None
    mrandom._set_cuda_rng_state = lambda *a, **k: None
    tutils.get_default_causal_mask = _cpu_causal_mask
    tutils.get_sliding_window_causal_mask = _cpu_sliding_window_mask
    schedules.torch = _CpuTorch()
    _APPLIED = True
    return True


def seed_model_parallel_rng(seed: int, tp_rank: int) -> None:
    """Megatron's `model_parallel_cuda_manual_seed` on CPU: a TP-rank-specific stream for dropout in
    tensor-parallel regions (offset 2718 + tp_rank, as upstream)."""
    import megatron.core.tensor_parallel.random as mrandom

    tracker = mrandom.get_cuda_rng_tracker()
    tracker.reset()
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
