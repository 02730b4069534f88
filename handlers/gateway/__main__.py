"""``python -m handlers.gateway [--host H] [--port P] [-c CONFIG]``: ``jetpool gateway`` without the CLI."""

import argparse
import sys

import uvloop

from engine.logs import configure_logging
from handlers.gateway.server import command


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m handlers.gateway", description=command.help)
    command.add_arguments(parser)
    args = parser.parse_args()
    configure_logging(args.log_level)
    return uvloop.run(command.run(args))


if __name__ == "__main__":
    sys.exit(main())
