"""`python -m fireflyer.workloads.train …`: `fireflyer train` without the rest of the command line
(whose other subcommands import the operator's dependencies), for images that carry only torch."""

from __future__ import annotations

import argparse
import sys

from fireflyer.errors import FireflyerError
from fireflyer.workloads.train.cli import add_arguments, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fireflyer train", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except FireflyerError as error:  # the trainer's errors; the full CLI knows more kinds
        print(f"fireflyer: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
