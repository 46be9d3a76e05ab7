"""The settings a checkpoint records and a resume compares.

A checkpoint's `meta.json` keeps the fingerprinted settings themselves (not only their hash), so a
refused resume names each differing key; `--resume-with-changes KEY...` lists the deliberate ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import typing
from dataclasses import asdict
from typing import Any, Sequence

from toolkit.config import ConfigError, RunConfig, StageConfig
from toolkit.engines.spec import engine_spec
from toolkit.recipe_paths import is_path_setting, same_local_path

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
    """[{key, from, to}] for every key whose value differs (a missing key reads as None). A setting
    added to Embedforge after `old` was recorded is no change while it holds its default: the older
    run trained as the default does (a checkpoint stays resumable across an upgrade). Path settings
    compare the files they name (`data/x` recorded from the run's directory == its absolute path)."""
    return [{"key": k, "from": old.get(k), "to": new.get(k)} for k in sorted(set(old) | set(new))
            if json.dumps(old.get(k)) != json.dumps(new.get(k))
            and not (k not in old and _is_default(k, new.get(k)))
            and not (is_path_setting(k) and same_local_path(old.get(k), new.get(k)))]


def _is_default(key: str, value: Any) -> bool:
    default = setting_default(key)
    return default is not _NO_DEFAULT and json.dumps(value) == json.dumps(default)


_NO_DEFAULT = object()


def setting_default(key: str) -> Any:
    """The default of a flat setting name (`stages.<name>.objective.teacher.loss`, `model.dtype`), from
    the config dataclasses; a sentinel when the field is unknown or required."""
    parts = key.split(".")
    cls: Any = RunConfig
    if parts[0] == "stages" and len(parts) > 2:
        cls, parts = StageConfig, parts[2:]  # the stage's name is a key, not a field
    for i, name in enumerate(parts):
        if not dataclasses.is_dataclass(cls):
            return _NO_DEFAULT
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if name not in fields:
            return _NO_DEFAULT
        f = fields[name]
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:  # required here: its default can only come from deeper down
            cls = typing.get_type_hints(cls)[name]
            continue
        for rest in parts[i + 1:]:
            if not dataclasses.is_dataclass(value) or not hasattr(value, rest):
                return _NO_DEFAULT
            value = getattr(value, rest)
        value = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
        return json.loads(json.dumps(value, default=str))
    return _NO_DEFAULT


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
