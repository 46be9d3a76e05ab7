"""Relative paths inside a recipe file resolve against the recipe's folder, so a recipe means the same
from any directory (a recipe and its data / prompt files travel together).

Resolved (made absolute): `model.path`, each stage's `data.path` and `objective.teacher.prompt_file`. Left as written:
absolute and `~` paths, `asset:NAME`, URLs (`scheme://`, `pipe:`), `output_dir` (where a run writes is
the caller's choice, relative to the current directory as for any tool's output) and the overrides
given on the command line (`key=value`, typed relative to the current directory).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from toolkit.errors import InputError

NOT_A_LOCAL_PATH = re.compile(r"^(asset:|pipe:|[A-Za-z][A-Za-z0-9+.-]*://)")


def resolve_recipe_paths(data: dict, recipe_dir: Path) -> dict:
    """A recipe's YAML mapping with its relative paths joined to `recipe_dir`, made absolute (in place;
    returned): a run records the same paths however the recipe was named (`configs/x.yaml`, its
    absolute path from `submit slurm`, a Ray working directory), and a run's own config.yaml read
    back as a recipe means what it meant.

    A path that exists only as the current directory's (what relative recipe paths meant before) is
    refused naming both, rather than read from a folder where nothing is."""
    _resolve(data.get("model"), "path", recipe_dir, "model.path")
    stages = data.get("stages")
    for i, stage in enumerate(stages if isinstance(stages, list) else ()):
        if not isinstance(stage, dict):
            continue  # the config loader names the bad item
        _resolve(stage.get("data"), "path", recipe_dir, f"stages[{i}].data.path")
        objective = stage.get("objective")
        _resolve(objective.get("teacher") if isinstance(objective, dict) else None, "prompt_file", recipe_dir,
                 f"stages[{i}].objective.teacher.prompt_file")
    return data


def _resolve(section: Any, key: str, recipe_dir: Path, field: str) -> None:
    value = section.get(key) if isinstance(section, dict) else None
    if not isinstance(value, str) or not value.strip() or NOT_A_LOCAL_PATH.match(value):
        return
    if os.path.isabs(os.path.expanduser(value)):
        return
    resolved = os.path.abspath(os.path.join(recipe_dir, value))
    if not os.path.exists(resolved) and os.path.exists(value) and os.path.abspath(value) != resolved:
        raise InputError(f"{field}: {value!r} is read from the recipe's folder, where {resolved} does not exist; "
                         f"{os.path.abspath(value)} (from the current directory) does: write the path relative "
                         "to the recipe, or absolute")
    section[key] = resolved


def is_path_setting(key: str) -> bool:
    """A flat setting name (run_settings) whose value is a recipe path: compared as the file it names."""
    return key == "model.path" or (key.startswith("stages.") and key.endswith((".data.path", ".teacher.prompt_file")))


def same_local_path(a: Any, b: Any) -> bool:
    """Do two recorded path settings name the same file? A relative one (a run recorded before recipe
    paths were made absolute) is read against the current directory, where such a run was started."""
    if not (isinstance(a, str) and isinstance(b, str)) or NOT_A_LOCAL_PATH.match(a) or NOT_A_LOCAL_PATH.match(b):
        return a == b
    return os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b))
