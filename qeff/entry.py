"""Console entry points ``qeff`` and ``qeff-opt``.

Kept free of heavy imports: SIGINT and SIGTERM are taken over first, so an interrupt that comes
while the CLI's dependencies load is reported like any other (one line, no traceback). Both
raise :class:`KeyboardInterrupt` (SIGTERM as its subclass :class:`Terminated`), which unwinds
the command through its clean-up, and record what arrived in :data:`received`: the command-line
layer underneath turns an interrupt into an exit code and nothing else.
"""

from __future__ import annotations

__all__ = ["main", "opt_main", "Terminated", "install_handlers", "received"]

import signal
import sys

# "interrupted" (SIGINT) or "terminated" (SIGTERM) once one arrived.
received: str | None = None


class Terminated(KeyboardInterrupt):
    """SIGTERM: stops a command the way Ctrl-C does (staged files removed, one line)."""


def _interrupt(_signum: int, _frame: object) -> None:
    global received
    received = received or "interrupted"
    raise KeyboardInterrupt()


def _terminate(_signum: int, _frame: object) -> None:
    global received
    received = received or "terminated"
    raise Terminated()


def install_handlers() -> None:
    global received
    received = None
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _terminate)


def exit_code() -> int:
    return 143 if received == "terminated" else 130


def _start(program: str, entry: str) -> None:
    install_handlers()
    try:
        from qeff import cli
    except KeyboardInterrupt:
        sys.stderr.write(f"{program}: {received or 'interrupted'}; nothing was written\n")
        sys.exit(exit_code())
    getattr(cli, entry)()


def main() -> None:
    _start("qeff", "main")


def opt_main() -> None:
    _start("qeff-opt", "opt_main")
