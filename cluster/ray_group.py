"""Ray worker groups for torch.distributed training, and the restart loop around them.

The ranks of one torch.distributed world live and die together, so they are a *group*, not a pool:
a placement group reserves one bundle per rank up front (all or nothing), one actor per bundle is
one rank, and each actor gets the torchrun-style variables the trainer reads (RANK, LOCAL_RANK,
LOCAL_WORLD_SIZE, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) while the variables of whatever launched
the Ray cluster (SLURM_*, PMI_*, OMPI_*, a stale torchrun's) are removed: libraries that detect a
SLURM or MPI job from them would otherwise take the wrong rank and world size.

`run_training` runs `toolkit.train.Trainer` in every actor. When any rank dies or raises, the whole
group is torn down (a surviving rank would only hang in a collective) and a fresh one resumes from
the newest complete checkpoint, up to `max_failures` restarts. The training loop never imports Ray.

Nothing here imports torch at module level: an actor's process imports this module before its
environment is set up, and torch must see that environment when it is imported.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from toolkit.config import load_config
from toolkit.errors import EmbedforgeError, InputError

log = logging.getLogger(__name__)

STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
# Launchers that may surround a Ray cluster; their variables describe *their* job, not this group.
LAUNCHER_PREFIXES = ("SLURM", "PMI_", "PMIX_", "OMPI_", "MV2_", "TORCHELASTIC_")
# torchrun's per-process variables: set fresh for every rank, never inherited.
RANK_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
             "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")


def strip_launcher_env(environ: MutableMapping[str, str]) -> list[str]:
    """Remove inherited launcher and rank variables in place; returns their names (never values)."""
    names = [k for k in environ if k.startswith(LAUNCHER_PREFIXES) or k in RANK_VARS]
    for name in names:
        del environ[name]
    return sorted(names)


@dataclass(frozen=True)
class WorkerInfo:
    """Where one actor runs (from the actor itself) and the rank it was given."""

    bundle: int
    node_id: str
    node_ip: str
    pid: int
    gpu_ids: tuple[str, ...] = ()
    rank: int = -1
    local_rank: int = -1


def assign_ranks(workers: Sequence[WorkerInfo]) -> list[WorkerInfo]:
    """Ranks contiguous per node (nodes in bundle order), by GPU id then bundle within a node; returns
    the workers in rank order. Contiguous nodes keep TP groups (fastest-varying) inside one node."""
    node_order: dict[str, int] = {}
    for w in sorted(workers, key=lambda w: w.bundle):
        node_order.setdefault(w.node_id, len(node_order))

    def key(w: WorkerInfo) -> tuple:
        gpu = int(w.gpu_ids[0]) if w.gpu_ids and w.gpu_ids[0].isdigit() else -1
        return node_order[w.node_id], gpu, w.bundle

    ranked, local_counts = [], dict.fromkeys(node_order, 0)
    for rank, w in enumerate(sorted(workers, key=key)):
        ranked.append(WorkerInfo(w.bundle, w.node_id, w.node_ip, w.pid, w.gpu_ids, rank, local_counts[w.node_id]))
        local_counts[w.node_id] += 1
    return ranked


def rank_env(ranked: Sequence[WorkerInfo], master_port: int) -> list[dict[str, str]]:
    """Each rank's torch.distributed variables. With GPUs every rank on a node sees the node's group
    GPUs in LOCAL_RANK order, so `cuda:LOCAL_RANK` is its own GPU and NCCL can use peer access."""
    master = ranked[0]
    per_node: dict[str, list[WorkerInfo]] = {}
    for w in ranked:
        per_node.setdefault(w.node_id, []).append(w)
    envs = []
    for w in ranked:
        env = {"RANK": str(w.rank), "LOCAL_RANK": str(w.local_rank), "WORLD_SIZE": str(len(ranked)),
               "LOCAL_WORLD_SIZE": str(len(per_node[w.node_id])), "MASTER_ADDR": master.node_ip,
               "MASTER_PORT": str(master_port)}
        if w.gpu_ids:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(g for peer in per_node[w.node_id] for g in peer.gpu_ids)
        envs.append(env)
    return envs


class RankWorker:
    """One rank: a dedicated Ray worker process, so its environment and cwd are its own."""

    def __init__(self, workdir: str | None, threads: int) -> None:
        self.removed = strip_launcher_env(os.environ)
        if workdir:
            os.chdir(workdir)  # relative paths in a recipe mean what they mean for `embedforge train`
        self.threads = threads

    def identity(self, bundle: int) -> WorkerInfo:
        ctx = ray.get_runtime_context()
        gpus = tuple(str(g) for g in ctx.get_accelerator_ids().get("GPU", []))
        return WorkerInfo(bundle, ctx.get_node_id(), ray.util.get_node_ip_address(), os.getpid(), gpus)

    def free_port(self) -> int:
        with socket.socket() as s:  # rank 0's node: the rendezvous listens here
            s.bind(("", 0))
            return s.getsockname()[1]

    def setup(self, env: Mapping[str, str]) -> list[str]:
        """Inject this rank's variables, then import torch (it reads them at init, not before)."""
        os.environ.update(env)
        import torch

        torch.set_num_threads(self.threads)
        return self.removed

    def execute(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    def train(self, config: str, overrides: Sequence[str], resume: str) -> list[dict]:
        """`embedforge train` for this rank (rank 0 keeps the STOPPED marker launchers requeue on)."""
        from toolkit.train import run_recipe  # lazy: imports torch, which must see setup()'s environment

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        outcomes, _, _ = run_recipe(load_config(config, list(overrides)), resume=resume, clear_markers=False)
        return [{"stage": o.name, "final_dir": str(o.final_dir) if o.final_dir else None,
                 "steps_done": o.steps_done, "last_loss": o.last_loss} for o in outcomes]


class GroupStartError(EmbedforgeError, RuntimeError):
    """The group could not be placed or started. `retryable` is False when the bundles could not be
    reserved in time: a fresh group would wait for the same missing resources again."""

    def __init__(self, message: str, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class GroupSpec:
    workers: int
    cpus_per_worker: float = 1.0
    gpus_per_worker: int = 0  # 0 or 1: a torch.distributed rank drives one device
    strategy: str = "PACK"
    workdir: str | None = None  # actors' cwd (default: none, Ray's)
    env: Mapping[str, str] = field(default_factory=dict)  # extra variables, present when torch is imported
    start_timeout_s: float = 600.0  # reserving the bundles + starting the actors

    def __post_init__(self) -> None:
        if self.workers < 1 or self.cpus_per_worker <= 0:
            raise InputError(f"workers ({self.workers}) must be >= 1 and cpus_per_worker ({self.cpus_per_worker}) > 0")
        if self.gpus_per_worker not in (0, 1):
            raise InputError(f"gpus_per_worker must be 0 or 1 (one rank per GPU), got {self.gpus_per_worker}")
        if self.strategy not in STRATEGIES:
            raise InputError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")

    @property
    def bundle(self) -> dict[str, float]:
        return {"CPU": self.cpus_per_worker, **({"GPU": self.gpus_per_worker} if self.gpus_per_worker else {})}


class WorkerGroup:
    """A placement group with one actor per bundle; `actors` / `workers` are in rank order."""

    def __init__(self, spec: GroupSpec) -> None:
        self.spec = spec
        self.pg: PlacementGroup | None = None
        self.actors: list[Any] = []
        self.workers: list[WorkerInfo] = []

    def start(self) -> "WorkerGroup":
        spec = self.spec
        total = ray.cluster_resources()
        short = {k: v * spec.workers for k, v in spec.bundle.items() if v * spec.workers > total.get(k, 0)}
        if short:  # an autoscaler may still add nodes: wait, but say what for
            log.warning("the group needs %s, the cluster has %s now: waiting up to %.0f s", short,
                        {k: total.get(k, 0) for k in short}, spec.start_timeout_s)
        self.pg = placement_group([spec.bundle] * spec.workers, strategy=spec.strategy)
        try:
            ray.get(self.pg.ready(), timeout=spec.start_timeout_s)
        except GetTimeoutError:
            self.shutdown()
            raise GroupStartError(
                f"could not reserve {spec.workers} x {spec.bundle} ({spec.strategy}) within {spec.start_timeout_s:.0f} s; "
                f"cluster resources: {ray.cluster_resources()}", retryable=False) from None
        threads = max(1, int(spec.cpus_per_worker))
        env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
               "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", **spec.env}
        actor_cls = ray.remote(RankWorker)
        actors = [actor_cls.options(
            num_cpus=spec.cpus_per_worker, num_gpus=spec.gpus_per_worker, max_restarts=0,
            runtime_env={"env_vars": env},
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
        ).remote(spec.workdir, threads) for i in range(spec.workers)]
        self.actors = actors  # so shutdown() reaches them if what follows fails
        try:
            infos = ray.get([a.identity.remote(i) for i, a in enumerate(actors)], timeout=spec.start_timeout_s)
            self.workers = assign_ranks(infos)
            self.actors = [actors[w.bundle] for w in self.workers]
            port = ray.get(self.actors[0].free_port.remote(), timeout=spec.start_timeout_s)
            envs = rank_env(self.workers, port)
            removed = ray.get([a.setup.remote(e) for a, e in zip(self.actors, envs)], timeout=spec.start_timeout_s)
        except RayError as exc:
            self.shutdown()
            raise GroupStartError(f"worker group failed to start: {describe(exc)}") from exc
        if removed[0]:
            log.info("removed inherited launcher variables in the actors: %s", ", ".join(removed[0]))
        log.info("worker group up: %d ranks on %d node(s), rendezvous %s:%d", len(self.workers),
                 len({w.node_id for w in self.workers}), self.workers[0].node_ip, port)
        return self

    def call(self, method: str, *args: Any) -> list[ray.ObjectRef]:
        """Start `method` on every rank; the refs are in rank order."""
        return [getattr(a, method).remote(*args) for a in self.actors]

    def execute(self, fn: Callable[..., Any], *args: Any) -> list[Any]:
        """Run `fn(*args)` on every rank (fail-fast); results in rank order."""
        return wait_all(self.call("execute", fn, *args))

    def shutdown(self) -> None:
        """Kill every actor and free the bundles; safe to call twice and on a half-started group."""
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already dead
                pass
        self.actors = []
        if self.pg is not None:
            try:
                remove_placement_group(self.pg)
            except Exception:
                pass
            self.pg = None


def describe(exc: BaseException) -> str:
    """One line for a failure: the user exception of a task, or the first line of Ray's message."""
    cause = exc.cause if isinstance(exc, RayTaskError) and exc.cause is not None else exc
    if isinstance(cause, RayActorError):
        text = str(cause).strip().splitlines()
        line = next((t for t in text if "died" in t or "unavailable" in t.lower()), text[0] if text else "")
        return f"{type(cause).__name__}: {line.strip()[:300]}"
    first = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {(first[0] if first else '').strip()[:300]}"


def wait_all(refs: Sequence[ray.ObjectRef], grace_s: float = 5.0) -> list[Any]:
    """All results in order, failing fast: on the first error the others get `grace_s` to report
    theirs, then `RankFailures` names every rank that failed (a dead peer's error comes with the
    errors it caused)."""
    pending, results, errors = list(refs), {}, {}
    index = {ref: i for i, ref in enumerate(refs)}
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=None if not errors else grace_s)
        if not ready:  # grace over: the rest are stuck in collectives with a dead peer
            break
        for ref in ready:
            try:
                results[ref] = ray.get(ref)
            except RayError as exc:
                errors[index[ref]] = exc
    if errors:
        raise RankFailures(errors)
    return [results[r] for r in refs]


class RankFailures(EmbedforgeError, RuntimeError):
    """One attempt's failed ranks; the message lists them, dead processes first."""

    def __init__(self, errors: Mapping[int, BaseException]) -> None:
        self.errors = dict(sorted(errors.items()))
        died = [r for r, e in self.errors.items() if isinstance(e, RayActorError)]
        order = died + [r for r in self.errors if r not in died]  # the dead first: the likely cause
        super().__init__("; ".join(f"rank {r}: {describe(self.errors[r])}" for r in order))

    @property
    def lost_process(self) -> bool:
        """A rank's process (or its node) died: worth a restart. Otherwise every rank ran and raised
        (a bad model path, a non-finite loss): a restart would fail the same way."""
        return any(isinstance(e, RayActorError) or isinstance(getattr(e, "cause", None), RayActorError)
                   for e in self.errors.values())


class TrainingFailed(EmbedforgeError, RuntimeError):
    """The run gave up: restarts used up (or the group could not be placed); one line per attempt."""

    def __init__(self, failures: Sequence[str], max_failures: int, reason: str = "") -> None:
        self.failures = list(failures)
        lines = "\n".join(f"  attempt {i + 1}: {f}" for i, f in enumerate(self.failures))
        why = f"; {reason}" if reason else ""
        super().__init__(f"training failed {len(self.failures)} time(s) (max_failures={max_failures}){why}:\n{lines}")


@dataclass
class RunReport:
    """What a `run_training` call ended with: rank 0's stage outcomes and the failures survived."""

    stages: list[dict]
    failures: list[str]
    num_stages: int

    @property
    def completed(self) -> bool:
        return len(self.stages) == self.num_stages and all(s["final_dir"] for s in self.stages)

    @property
    def stopped_at(self) -> dict | None:
        """The stage and step a preemption stopped the run at (a checkpoint there); None when complete."""
        return None if self.completed or not self.stages else self.stages[-1]


def run_training(config: str | os.PathLike, overrides: Sequence[str] = (), *, workers: int,
                 cpus_per_worker: float = 1.0, gpus_per_worker: int = 0, max_failures: int = 3,
                 strategy: str = "PACK", resume: str = "auto", workdir: str | None = None,
                 env: Mapping[str, str] | None = None, start_timeout_s: float = 600.0,
                 on_start: Callable[[WorkerGroup, int], None] | None = None) -> RunReport:
    """Train a recipe on a fresh worker group, restarting from the newest complete checkpoint after a
    failure (up to `max_failures` times). Needs `ray.init` done. A run stopped by a preemption signal
    (checkpoint saved) is returned as is: resubmitting it continues; retrying here would fight the
    scheduler that asked it to stop. `on_start(group, attempt)` sees each group once it is up."""
    from toolkit.train import clear_run_markers  # lazy: torch (see the module docstring)

    workdir = os.path.abspath(workdir or os.getcwd())
    config = os.path.join(workdir, os.fspath(config))
    cfg = load_config(config, list(overrides))  # a bad recipe fails here, not in every actor
    if max_failures < 0:
        raise InputError(f"max_failures must be >= 0, got {max_failures}")
    spec = GroupSpec(workers=workers, cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker,
                     strategy=strategy, workdir=workdir, env=dict(env or {}), start_timeout_s=start_timeout_s)
    clear_run_markers(Path(workdir) / cfg.output_dir)  # once: a notice relayed during a restart must survive it
    failures: list[str] = []
    attempt = 0
    while True:
        attempt += 1
        group = WorkerGroup(spec)
        t0 = time.monotonic()
        try:
            group.start()
            if on_start is not None:
                on_start(group, attempt)
            # A restart always resumes: the checkpoints it continues from are this run's own.
            results = wait_all(group.call("train", config, list(overrides), resume if attempt == 1 else "auto"))
        except (RankFailures, GroupStartError) as exc:
            failures.append(f"{exc} (after {time.monotonic() - t0:.0f} s)")
            if not getattr(exc, "retryable", True):
                raise TrainingFailed(failures, max_failures, "not retried: the resources never became free") from exc
            if isinstance(exc, RankFailures) and not exc.lost_process:
                raise TrainingFailed(failures, max_failures, "not retried: no process died, a rank raised "
                                     "(it would raise again)") from exc
            if len(failures) > max_failures:
                raise TrainingFailed(failures, max_failures) from exc
            log.warning("attempt %d failed (%s); tearing the group down and restarting from the newest complete "
                        "checkpoint (%d of %d restarts used)", attempt, exc, len(failures), max_failures)
            continue
        finally:
            group.shutdown()
        report = RunReport(stages=results[0], failures=failures, num_stages=len(cfg.stages))
        if not report.completed:
            stop = report.stopped_at or {}
            log.warning("the run stopped at stage %s step %s with a checkpoint (preemption or deadline); "
                        "resubmit to continue", stop.get("stage"), stop.get("steps_done"))
        return report
