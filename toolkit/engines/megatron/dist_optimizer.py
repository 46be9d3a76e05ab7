"""ZeRO-1 for the megatron engine: fp32 main gradients, fp32 masters and Adam state sharded over DP.

megatron-core's own `DistributedOptimizer` cannot run on CPU / gloo (megatron-core 0.16.1): it
accepts only parameters whose `Tensor.type()` is `torch.cuda.FloatTensor` / `HalfTensor` /
`BFloat16Tensor` (`distrib_optimizer._build_model_and_main_param_groups` raises `TypeError:
Wrapped parameters must be one of torch.cuda.FloatTensor, ... Received torch.FloatTensor`), and its
base class and clipping allocate `device='cuda'` tensors and assert `torch.cuda.FloatTensor` grads.
A shim would have to make CPU tensors lie about their type, so this module implements the same
scheme with torch collectives (which gloo has, reduce-scatter included):

- trainable parameters live in contiguous flat buffers, one per bucket (~`BUCKET_ELEMENTS`, per
  dtype, in reverse registration order = roughly the order the backward produces gradients);
  each parameter's `.data` is a view into its bucket, so the all-gather after the update writes
  the parameters in place;
- a post-accumulate-grad hook adds each gradient into the bucket's fp32 main-gradient buffer and
  drops `param.grad`; when every parameter of a bucket has reported during a backward with sync
  enabled (the pipeline schedule's `no_sync_func` disables it for all but the last micro-batch),
  the bucket's reduce-scatter starts asynchronously: reduction overlaps the rest of the backward;
- DP rank r owns elements [r*S, (r+1)*S) of every bucket (padded to a multiple of dp): it keeps the
  DP-summed fp32 gradient, the fp32 master (the parameter buffer itself when the parameters are
  fp32) and torch AdamW's m, v only for that range, so optimizer state per rank is 1/dp;
- torch AdamW runs on one leaf per (parameter, owned range): per-parameter step counts, and a
  parameter without a gradient is not updated, exactly as the plain path; then the updated range is
  cast to the parameter dtype and all-gathered into the bucket.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

BUCKET_ELEMENTS = 40_000_000  # megatron's default bucket size (elements)
MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass(eq=False)
class _Slot:
    """One parameter's place in its bucket, and the part of it this rank owns (param-flat coords)."""

    name: str
    param: torch.nn.Parameter
    bucket: _Bucket
    start: int  # offset of the parameter in the bucket
    own_lo: int = 0
    own_hi: int = 0
    leaf: torch.nn.Parameter | None = None  # the owned fp32 master range AdamW updates

    @property
    def numel(self) -> int:
        return self.param.numel()

    def owned_grad(self) -> Tensor:
        """The DP-summed fp32 gradient of the owned range (a view into the bucket's shard)."""
        b = self.bucket
        return b.grad_shard[self.start + self.own_lo - b.lo : self.start + self.own_hi - b.lo]


@dataclass(eq=False)
class _Bucket:
    dtype: torch.dtype
    slots: list[_Slot] = field(default_factory=list)
    numel: int = 0
    lo: int = 0  # owned range [lo, hi) in bucket coordinates
    hi: int = 0
    params: Tensor | None = None  # the parameters, flat, padded (model dtype)
    main_grad: Tensor | None = None  # fp32, accumulated by the hooks
    grad_shard: Tensor | None = None  # fp32, the owned range after reduce-scatter
    master: Tensor | None = None  # fp32 owned range (a view of `params` when they are fp32)
    ready: set = field(default_factory=set)
    handle: object = None
    launched: bool = False


class DistributedOptimizer:
    """AdamW over DP-sharded fp32 masters; `step()` / `zero_grad()` as a torch optimizer.

    `inner` is the torch AdamW (the LR scheduler's optimizer)."""

    def __init__(self, params: dict[str, torch.nn.Parameter], *, lr: float, betas, eps: float,
                 weight_decay: float, dp_group, bucket_elements: int | None = None):
        self.group = dp_group
        self.dp = dist.get_world_size(dp_group) if dist.is_initialized() and dp_group is not None else 1
        self.dp_rank = dist.get_rank(dp_group) if self.dp > 1 else 0
        self.slots: dict[str, _Slot] = {}
        self.buckets = self._make_buckets(params, bucket_elements or BUCKET_ELEMENTS)
        self.had_grad: set[str] = set()
        self.steps = dict.fromkeys(self.slots, 0)  # per-parameter Adam steps (replicated over DP)
        self.sync_enabled = True
        self.overlap = True
        self.launched_in_backward = 0  # buckets whose reduction started inside the backward (overlap)
        self._hooks = [s.param.register_post_accumulate_grad_hook(self._hook(s)) for s in self.slots.values()]
        leaves = [s.leaf for s in self.slots.values() if s.leaf is not None]
        if not leaves:  # a rank owning nothing (tiny buckets, large dp) still needs a param group
            leaves = [torch.nn.Parameter(torch.zeros(0))]
        self.inner = torch.optim.AdamW(leaves, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    # ------------------------------------------------------------------ layout
    def _make_buckets(self, params: dict[str, torch.nn.Parameter], limit: int) -> list[_Bucket]:
        buckets: list[_Bucket] = []
        open_: dict[torch.dtype, _Bucket] = {}
        for name, p in reversed(list(params.items())):
            b = open_.get(p.dtype)
            if b is None or (b.numel and b.numel + p.numel() > limit):
                b = open_[p.dtype] = _Bucket(p.dtype)
                buckets.append(b)
            self.slots[name] = _Slot(name, p, b, b.numel)
            b.slots.append(self.slots[name])
            b.numel += p.numel()
        for b in buckets:
            self._allocate(b)
        return buckets

    def _allocate(self, b: _Bucket) -> None:
        shard = -(-b.numel // self.dp)
        b.lo, b.hi = self.dp_rank * shard, (self.dp_rank + 1) * shard
        device = b.slots[0].param.device
        b.params = torch.zeros(shard * self.dp, dtype=b.dtype, device=device)
        b.main_grad = torch.zeros(shard * self.dp, dtype=torch.float32, device=device)
        b.grad_shard = torch.zeros(shard, dtype=torch.float32, device=device)
        for s in b.slots:
            view = b.params[s.start : s.start + s.numel].view_as(s.param)
            view.copy_(s.param.data)
            s.param.data = view
        b.master = b.params[b.lo : b.hi] if b.dtype == torch.float32 else b.params[b.lo : b.hi].float()
        for s in b.slots:
            s.own_lo = min(max(b.lo - s.start, 0), s.numel)
            s.own_hi = max(min(b.hi - s.start, s.numel), s.own_lo)
            if s.own_hi > s.own_lo:
                s.leaf = torch.nn.Parameter(b.master[s.start + s.own_lo - b.lo : s.start + s.own_hi - b.lo])

    # ------------------------------------------------------------------ gradients
    def _hook(self, slot: _Slot):
        b = slot.bucket
        main = b.main_grad[slot.start : slot.start + slot.numel].view_as(slot.param)

        def hook(param: Tensor) -> None:
            if b.launched:
                raise RuntimeError(f"{slot.name}: a gradient arrived after its bucket's reduction started")
            main.add_(param.grad)
            param.grad = None
            self.had_grad.add(slot.name)
            if self.sync_enabled and self.overlap:
                b.ready.add(slot.name)
                if len(b.ready) == len(b.slots):
                    self._launch(b)
                    self.launched_in_backward += 1

        return hook

    @contextlib.contextmanager
    def no_sync(self):
        """The pipeline schedule's `no_sync_func`: gradients accumulate, no reduction starts."""
        self.sync_enabled = False
        try:
            yield
        finally:
            self.sync_enabled = True

    @contextlib.contextmanager
    def without_overlap(self):
        """Reductions only at `finish_grad_sync` (backwards whose gradient order is irregular)."""
        self.overlap = False
        try:
            yield
        finally:
            self.overlap = True

    def _launch(self, b: _Bucket) -> None:
        b.launched = True
        if self.dp == 1:
            b.grad_shard.copy_(b.main_grad)
            return
        b.handle = dist.reduce_scatter_tensor(b.grad_shard, b.main_grad, group=self.group, async_op=True)

    def finish_grad_sync(self) -> None:
        """Start the reductions the backward did not, wait for all: owned ranges hold DP-mean grads."""
        for b in self.buckets:
            if not b.launched:
                self._launch(b)
        for b in self.buckets:
            if b.handle is not None:
                b.handle.wait()
                b.handle = None
            if self.dp > 1:
                b.grad_shard.div_(self.dp)

    def owned_grads(self, names) -> list[Tensor]:
        """The owned, reduced gradient ranges of these parameters (views; empty ones left out)."""
        return [self.slots[n].owned_grad() for n in names if self.slots[n].own_hi > self.slots[n].own_lo]

    def zero_grad_range(self, name: str, lo: int, hi: int) -> None:
        """Zero elements [lo, hi) (flat, of the whole parameter) of a reduced gradient where owned."""
        s = self.slots[name]
        a, z = max(lo, s.own_lo), min(hi, s.own_hi)
        if z > a:
            s.owned_grad()[a - s.own_lo : z - s.own_lo] = 0

    def sum_of_squares(self, counted) -> Tensor:
        """Sum of squared owned gradients of the parameters `counted(name)` selects, summed over DP."""
        sq = torch.zeros(1, dtype=torch.float64, device=self.buckets[0].main_grad.device if self.buckets else None)
        for name, s in self.slots.items():
            if name in self.had_grad and s.own_hi > s.own_lo and counted(name):
                sq += torch.linalg.vector_norm(s.owned_grad(), dtype=torch.float32).double() ** 2
        if self.dp > 1:
            dist.all_reduce(sq, group=self.group)
        return sq

    def scale_grads(self, coef: Tensor) -> None:
        for b in self.buckets:
            b.grad_shard.mul_(coef)

    # ------------------------------------------------------------------ update
    def step(self) -> None:
        """AdamW on the owned ranges of parameters that had a gradient, then all-gather the buckets."""
        for name, s in self.slots.items():
            if s.leaf is not None:
                s.leaf.grad = s.owned_grad() if name in self.had_grad else None
        self.inner.step()
        for name in self.had_grad:
            self.steps[name] += 1
        handles = []
        for b in self.buckets:
            if b.dtype != torch.float32:
                b.params[b.lo : b.hi].copy_(b.master)
            if self.dp > 1:
                handles.append(dist.all_gather_into_tensor(b.params, b.params[b.lo : b.hi].clone(),
                                                           group=self.group, async_op=True))
        for h in handles:
            h.wait()

    def step_as_if_every_param_had_a_grad(self) -> None:
        """The dry run (meta device): the Adam state the first step creates when every parameter had
        a gradient; the backward hooks, which record that, do not run there."""
        self.had_grad.update(self.slots)
        self.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for b in self.buckets:
            b.main_grad.zero_()
            b.grad_shard.zero_()
            b.ready.clear()
            b.launched, b.handle = False, None
        for s in self.slots.values():
            s.param.grad = None
            if s.leaf is not None:
                s.leaf.grad = None
        self.had_grad.clear()
        self.sync_enabled = True

    def close(self) -> None:
        """Remove the gradient hooks (a later stage builds its own optimizer)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    @property
    def keeps_masters(self) -> bool:
        """fp32 masters apart from the parameters (16-bit parameters)."""
        return any(b.dtype != torch.float32 for b in self.buckets)

    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

    def grad_bytes(self) -> int:
        """Bytes of gradient buffers this rank holds: the full fp32 main gradients and the owned,
        DP-reduced fp32 range (`param.grad` is dropped as soon as it is accumulated)."""
        return sum(b.main_grad.nbytes + b.grad_shard.nbytes for b in self.buckets)

    def state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds: Adam m, v and fp32 masters kept apart from the
        parameters (none when the parameters are fp32: they are their own masters)."""
        total = sum(t.numel() * t.element_size() for st in self.inner.state.values()
                    for k, t in st.items() if k in MOMENTS)
        return total + sum(b.master.numel() * 4 for b in self.buckets if b.dtype != torch.float32)

    # ------------------------------------------------------------------ checkpoints
    def gather_state(self) -> dict[str, dict[str, Tensor]]:
        """Each parameter's full (this TP / PP piece) Adam m, v, and fp32 master when kept apart,
        all-gathered over DP: a collective. The checkpoint saves these with the parameter's own
        sharding, so it loads at any DP size and TP / PP layout (megatron-core 0.16 dropped
        `ShardedTensor.flattened_range`, which would let each rank write only its range)."""
        out: dict[str, dict[str, Tensor]] = {name: {} for name in self.slots}
        keys = [*MOMENTS] + (["master"] if self.keeps_masters else [])
        for b in self.buckets:
            for key in keys:
                shard = torch.zeros(b.hi - b.lo, dtype=torch.float32, device=b.main_grad.device)
                for s in b.slots:
                    if s.leaf is None:
                        continue
                    source = s.leaf.data if key == "master" else self.inner.state.get(s.leaf, {}).get(key)
                    if source is not None:
                        shard[s.start + s.own_lo - b.lo : s.start + s.own_hi - b.lo] = source
                if key == "master" and b.dtype == torch.float32:  # the parameters are the masters
                    for s in b.slots:
                        out[s.name][key] = s.param.detach().clone()
                    continue
                full = torch.empty(shard.numel() * self.dp, dtype=torch.float32, device=shard.device)
                if self.dp > 1:
                    dist.all_gather_into_tensor(full, shard, group=self.group)
                else:
                    full.copy_(shard)
                for s in b.slots:
                    out[s.name][key] = full[s.start : s.start + s.numel].view_as(s.param).clone()
        return out

    def load_state(self, name: str, state: dict[str, Tensor], step: int) -> None:
        """This rank's owned range of a parameter's full m, v (and master; else the loaded weights)."""
        s = self.slots[name]
        self.steps[name] = int(step)
        if s.leaf is None:
            return
        with torch.no_grad():
            master = state.get("master")
            if s.bucket.dtype != torch.float32:
                source = master if master is not None else s.param.data
                s.leaf.copy_(source.reshape(-1)[s.own_lo : s.own_hi].float())
            if step == 0:
                self.inner.state.pop(s.leaf, None)
                return
            self.inner.state[s.leaf] = {"step": torch.tensor(float(step))} | {
                k: state[k].reshape(-1)[s.own_lo : s.own_hi].float().clone() for k in MOMENTS}
