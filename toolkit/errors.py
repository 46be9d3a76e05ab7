"""The project's error base: an expected failure the user can fix (a bad config value, a missing file
they named, a wrong checkpoint, a bad argument). The CLI prints its message as one line (exit 2);
any other exception is a bug and propagates with its traceback.

The lowest layer: imports nothing from the project. A subclass keeps the builtin type it replaced as
a second base (ValueError, FileNotFoundError, ...), so `except ValueError` callers keep working.
"""

from __future__ import annotations


class EmbedforgeError(Exception):
    """An expected failure the user can fix; the CLI prints its message as one line, no traceback."""


class InputError(EmbedforgeError, ValueError):
    """A bad argument, option or input value (not a recipe field: that is toolkit.config.ConfigError)."""


class MissingPathError(EmbedforgeError, FileNotFoundError):
    """A file or folder the user named (or one it must contain) does not exist."""


class PathExistsError(EmbedforgeError, FileExistsError):
    """An output that already exists; pass --overwrite (or choose another path)."""


class CheckpointError(EmbedforgeError, ValueError):
    """A checkpoint or model folder that does not fit: another engine, layout, model or format."""


class NonFiniteError(EmbedforgeError, FloatingPointError):
    """Training stopped on non-finite steps (loss / grad norm / weights); the newest good checkpoint is kept."""


class OutputError(EmbedforgeError, OSError):
    """An output path that cannot be written (read-only, below a file, disk full); the message names it."""
