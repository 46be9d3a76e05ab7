"""Where the bundled recipes live (`configs/` of the source tree): the quickstarts' defaults name them
by absolute path, so `embedforge quickstart` runs from any directory."""

from __future__ import annotations

from pathlib import Path

RECIPES_DIR = Path(__file__).resolve().parents[1] / "configs"
QUICKSTART_RECIPE = RECIPES_DIR / "quickstart.yaml"
