"""Issue 20, item 3: every `embedforge ... --help` page shows each option's default, and the main
commands show examples."""

from __future__ import annotations

import argparse

import pytest

from launchers.cli import build_parser
from launchers.cli_format import SILENT_DEFAULT, HelpFormatter

MAIN_COMMANDS = ["train", "encode", "export", "quickstart", "plan", "eval run", "eval sweep", "teacher score",
                 "submit slurm", "submit ray", "data build"]


def leaf_parsers(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    """Every command's parser by its words ("eval run"), the top-level one included ("")."""
    found = {prefix: parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.update(leaf_parsers(sub, f"{prefix} {name}".strip()))
    return found


PARSERS = leaf_parsers(build_parser())


def flat(text: str) -> str:
    return " ".join(text.split())


def shows_default(action: argparse.Action) -> bool:
    return (bool(action.option_strings) and action.help is not argparse.SUPPRESS
            and not any(action.default is d for d in SILENT_DEFAULT) and action.default != []
            and not isinstance(action, argparse._HelpAction))


@pytest.mark.parametrize("command", sorted(PARSERS))
def test_every_option_with_a_default_shows_it(command):
    parser = PARSERS[command]
    assert parser.formatter_class is HelpFormatter, command
    page = flat(parser.format_help())
    for action in filter(shows_default, parser._actions):
        shown = f"(default: {action.default})"
        assert shown in page or "(default:" in flat(action.help or ""), (command, action.option_strings, page)
        assert page.count(shown) >= 1 and f"{shown} {shown}" not in page  # once, never doubled


def test_every_command_is_checked():
    assert set(MAIN_COMMANDS) <= set(PARSERS)
    assert any(shows_default(a) for name in MAIN_COMMANDS for a in PARSERS[name]._actions)


@pytest.mark.parametrize("command", MAIN_COMMANDS)
def test_main_commands_show_examples(command):
    page = PARSERS[command].format_help()
    assert "\nexamples:\n" in page, command
    lines = page.split("\nexamples:\n", 1)[1].splitlines()
    assert 1 <= len([line for line in lines if line.strip()]) <= 3
    assert all(line.startswith("  ") and ("embedforge" in line) for line in lines if line.strip())
    words = command.split()
    assert any(" ".join(words) in line for line in lines), (command, lines)  # the examples run this command


def test_help_without_text_still_shows_the_default():
    parser = argparse.ArgumentParser(formatter_class=HelpFormatter)
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--flag", action="store_true")
    parser.add_argument("--name", default=None, help="a name")
    page = flat(parser.format_help())
    assert "--n N (default: 64)" in page
    assert "(default: False)" not in page and "(default: None)" not in page


def test_top_level_help_runs(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["eval", "run", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--task-size TASK.FIELD=N" in out and "(default: only-missing)" in flat(out)


def test_a_default_path_is_never_broken_across_lines():
    """A checkout under a folder with hyphens (e.g. /tmp/ci-clone) made argparse wrap the default recipe
    path at a hyphen, so `--help` showed `/tmp/ci-` and `clone/...` on two lines."""
    parser = argparse.ArgumentParser(prog="x", formatter_class=lambda prog: HelpFormatter(prog, width=60))
    path = "/tmp/some-checkout-with-hyphens/configs/d2llm/quickstart-long-name.yaml"
    parser.add_argument("--config", default=path, help="the student recipe, a YAML file in the checkout")
    assert any(path + ")" in line for line in parser.format_help().splitlines())
