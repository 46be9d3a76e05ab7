"""The settings a checkpoint records and a resume compares.

A checkpoint's `meta.json` keeps the fingerprinted settings themselves (not only their hash), so a
refused resume names each differing key; `--resume-with-changes KEY...` lists the deliberate ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from typing import Any, Sequence

from toolkit.config import ConfigError, RunConfig, StageConfig
from toolkit.engines.spec import engine_spec

log = logging.getLogger(__name__)


def stage_fingerprint(stage: StageConfig) -> str:
    """The stage-only hash checkpoints carried before `settings` were recorded in meta.json; kept so
    such a checkpoint still resumes when its stage is unchanged."""
    data = {k: v for k, v in asdict(stage).items() if k != "steps"}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprint_settings(cfg: RunConfig, stages: Sequence[StageConfig] | None = None) -> dict[str, Any]:
    """Every setting that changes the model or its trajectory, as flat `key.sub` names (the ones
    overrides and --resume-with-changes use): seed, engine, model, pooling, ZeRO stage and each stage
    but its `steps`. Operational settings stay out: output_dir, logging, checkpoint, eval, the parallel
    layout (resume reshards) and a stage's length (`steps`: extending a run is allowed)."""
    tree: dict[str, Any] = {"seed": cfg.seed, "engine": cfg.engine, "model": asdict(cfg.model),
                            "pooling": asdict(cfg.pooling)}
    tree.update(engine_spec(cfg.engine).trajectory_settings(cfg))  # e.g. DeepSpeed's ZeRO stage
    tree["stages"] = {s.name: {k: v for k, v in asdict(s).items() if k not in ("name", "steps")}
                      for s in (cfg.stages if stages is None else stages)}
    return json.loads(json.dumps(_flatten(tree), default=str))  # tuples -> lists: comparable with meta.json


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def settings_changes(old: dict[str, Any], new: dict[str, Any]) -> list[dict[str, Any]]:
    """[{key, from, to}] for every key whose value differs (a missing key reads as None)."""
    return [{"key": k, "from": old.get(k), "to": new.get(k)} for k in sorted(set(old) | set(new))
            if json.dumps(old.get(k)) != json.dumps(new.get(k))]


def describe_change(change: dict[str, Any]) -> str:
    return f"{change['key']}: {json.dumps(change['from'])} -> {json.dumps(change['to'])}"


def _allowed(key: str, allowed: Sequence[str]) -> bool:
    """A listed key allows itself and every key under it (`stages.extra` allows a whole new stage)."""
    return any(key == a or key.startswith(a + ".") for a in allowed)


def check_changes(what: str, old: dict[str, Any], new: dict[str, Any], allowed: Sequence[str]) -> list[dict[str, Any]]:
    """Refuse (naming every differing key) unless each differing key was listed in `allowed`; return the
    accepted changes, logged loudly: a resume that trains on other settings must never be silent."""
    changes = settings_changes(old, new)
    refused = [c for c in changes if not _allowed(c["key"], allowed)]
    if refused:
        raise ConfigError(
            f"{what} was written with different settings: {'; '.join(map(describe_change, refused))}. Resume with "
            "the same settings, start a new output_dir, or change them deliberately with --resume-with-changes "
            + " ".join(c["key"] for c in refused))
    for change in changes:
        log.warning("RESUMING WITH A CHANGED SETTING (--resume-with-changes) in %s: %s", what, describe_change(change))
    return changes
