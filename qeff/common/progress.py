"""A byte-counting progress bar for the steps that walk every weight of a model."""

from __future__ import annotations

__all__ = ["bytes_progress"]

import contextlib
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def bytes_progress(total: int, label: str, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(nbytes)``; a transient rich bar on stderr when ``enabled`` and ``total`` > 0."""
    if not enabled or total <= 0:
        yield lambda nbytes: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    bar = Progress(TextColumn(f"[bold]{label}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   transient=True, console=Console(stderr=True))
    task = bar.add_task(label, total=total)
    with bar:
        yield lambda nbytes: bar.advance(task, nbytes)
