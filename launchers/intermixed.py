"""Recipe overrides anywhere on the command line: `train R --resume auto key=v` as well as `train R key=v --resume auto`.

argparse stops collecting a `nargs="*"` positional at the first option, so overrides after an option
were "unrecognized arguments"; `parse_known_intermixed_args` collects them wherever they are.
"""

from __future__ import annotations

import argparse


class IntermixedParser(argparse.ArgumentParser):
    _inner = False

    def parse_known_args(self, args=None, namespace=None):
        if self._inner:  # parse_known_intermixed_args calls back into parse_known_args
            return super().parse_known_args(args, namespace)
        self._inner = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inner = False


def take_overrides_anywhere(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Subparsers build plain parsers: make this one accept its overrides before or after its options."""
    parser.__class__ = IntermixedParser
    return parser
