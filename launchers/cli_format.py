"""How every `embedforge` help page looks: each option's default, and the examples as written.

`Parser` is the top-level parser's class; argparse builds every subcommand's parser with the class
of the parser it hangs under, so the whole tree shows defaults without each `add_parser` asking.
"""

from __future__ import annotations

import argparse
import copy
import textwrap

SILENT_DEFAULT = (None, argparse.SUPPRESS, False)  # "(default: None)" on an unset option or a flag says nothing


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows `(default: X)` after every option that has one (also one without a help text); a
    description or epilog written over several lines (the examples) keeps its line breaks, a one-line
    description is wrapped to the terminal."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return super()._fill_text(text, width, indent)  # RawDescriptionHelpFormatter: as written
        return argparse.HelpFormatter._fill_text(self, text, width, indent)

    def _split_lines(self, text: str, width: int) -> list[str]:
        """An option's help wrapped at spaces only: a default path such as /srv/my-runs/recipe.yaml stays
        whole, to be copied (argparse also breaks at hyphens and inside long words)."""
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False, break_long_words=False)

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        silent = any(action.default is d for d in SILENT_DEFAULT) or action.default == []
        if silent or "(default" in help_text or isinstance(action, argparse._HelpAction):
            return help_text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return f"{help_text} (default: %(default)s)".lstrip()
        return help_text

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and action.help is not argparse.SUPPRESS and self._get_help_string(action):
            action = copy.copy(action)  # argparse prints no default for an option without help text
            action.help = "(default: %(default)s)"
        return super()._format_action(action)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser with Embedforge's help layout (subcommand parsers inherit the class)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def examples(*commands: str) -> str:
    """An epilog of example command lines, each on its own line as typed."""
    return "examples:\n" + "\n".join(f"  {c}" for c in commands)
