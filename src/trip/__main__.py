"""The `trip` command (and `python -m trip`). Importing the CLI takes a while (pydantic, yaml, argparse trees):
a Ctrl-C then, before `trip.cli.main` arms its signal handling, ends in one line and exit status 130, as one
during a run does, not in a traceback of the import."""

import signal
import sys


def main() -> int:
    try:
        from trip.cli import main as cli_main

        return cli_main()
    except KeyboardInterrupt:  # only before cli_main handles it: during the imports or the argument parsing
        print("interrupted (SIGINT): stopped during start-up, before the run began; nothing to resume",
              file=sys.stderr)
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
