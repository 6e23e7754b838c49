"""The one atomic writer: files appear at their destination complete or not at all.

Rules:
- :class:`Staging` is a temporary folder beside the destination (same file system, so the
  final step is a rename). The caller writes the main file and its companions (a model's data
  file, its manifest) into it; ``commit`` moves the companions first and the main file last.
- The rename of the main file is the only commit point. Companions must therefore never
  replace a file the old main file still uses: a model's data file gets a name unique to each
  save (:func:`unique_data_name`), and the files the old output used are removed only after
  the new main file is in place (``obsolete``).
- SIGINT and SIGTERM arriving during a commit are held until it is over
  (:func:`signals_deferred`), so an interrupted run has either written everything or nothing;
  :func:`published` says which, for the "interrupted" message.
- Staging folders and temporary files carry the writer's host and process id; one left by a
  killed run on this host is removed by the next writer in that folder.
- :func:`write_text_atomic` writes one small text file through a uniquely named temporary file;
  :func:`save_figure_atomic` a matplotlib figure through a staging file.
"""

from __future__ import annotations

__all__ = ["Staging", "write_text_atomic", "save_figure_atomic", "signals_deferred", "published", "forget_published",
           "unique_data_name", "remove_stale_staging", "STAGING_PREFIX"]

import contextlib
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

STAGING_PREFIX = ".qeff-staging-"
# The host is part of the name: on a folder shared between machines, only this machine can tell
# whether the writer of an entry is gone.
_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"
_STALE = re.compile(re.escape(STAGING_PREFIX + _HOST) + r"-(\d+)-")

# Paths published (renamed into place) by this process, in order: what an interrupted command
# reports as written.
_PUBLISHED: list[Path] = []

# Called with a step name: "before" a commit, then "start" and "companions" inside it, with
# signals deferred.
# Tests use it to interrupt a commit at a known point; nothing else sets it.
commit_hook: Callable[[str], None] | None = None


def published() -> list[Path]:
    """Paths this process has put into place so far."""
    return list(_PUBLISHED)


def forget_published() -> None:
    """Start a new command: nothing it wrote yet."""
    _PUBLISHED.clear()


def _publish(path: Path) -> None:
    # A file moved inside a staging folder is not visible yet: it is published with the folder.
    if not path.resolve().parent.name.startswith(STAGING_PREFIX):
        _PUBLISHED.append(path)


def unique_data_name(destination: str | os.PathLike) -> str:
    """``model.onnx`` → ``model.onnx.<8 hex>.data``: a data file name no earlier save used, so
    writing it never touches the data file an existing model at the destination reads."""
    return f"{Path(destination).name}.{secrets.token_hex(4)}.data"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def remove_stale_staging(folder: str | os.PathLike) -> list[Path]:
    """Remove staging folders and temporary files in ``folder`` whose writer process is gone."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _STALE.match(entry.name)
        if not match or _alive(int(match.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
        logger.info("removed %s, left by an interrupted run", entry)
    return removed


def _staging_prefix() -> str:
    return f"{STAGING_PREFIX}{_HOST}-{os.getpid()}-"


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM for the duration of the block, then act on the first one held.

    Python runs signal handlers in the main thread only, so replacing the handlers is enough
    there; from another thread the block runs unprotected (the caller owns signals then)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []

    def hold(signum: int, _frame: object) -> None:
        held.append(signum)

    previous = {s: signal.signal(s, hold) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if held:
            handler = previous[held[0]]
            if callable(handler):
                handler(held[0], None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(held[0])


class Staging:
    """``Staging(destination)``: ``path`` is where to write the main file, ``folder`` the rest."""

    def __init__(self, destination: str | os.PathLike) -> None:
        self.destination = Path(destination)
        self.parent = self.destination.resolve().parent
        remove_stale_staging(self.parent)
        self.folder = Path(tempfile.mkdtemp(prefix=_staging_prefix(), suffix=".tmp", dir=self.parent))
        self.path = self.folder / self.destination.name

    def commit(self, companions: Sequence[str] = (), obsolete: Iterable[str | os.PathLike] = ()) -> Path:
        """Move ``companions`` (file names in the folder), then the main file, into place; then
        remove ``obsolete`` (files the previous output used and the new one does not).
        Returns the destination."""
        _step("before")  # an interrupt here: nothing moved, the old output stays
        try:
            with signals_deferred():
                _step("start")
                moved = []
                try:
                    for name in companions:
                        staged = self.folder / name
                        if staged.exists():
                            os.replace(staged, self.parent / name)
                            moved.append(self.parent / name)
                    _step("companions")
                    os.replace(self.path, self.parent / self.destination.name)
                except BaseException:
                    for path in moved:  # without the new main file they belong to nothing
                        path.unlink(missing_ok=True)
                    raise
                _publish(self.destination)
                for path in obsolete:
                    Path(path).unlink(missing_ok=True)
        finally:
            self.discard()
        return self.destination

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _step(name: str) -> None:
    if commit_hook is not None:
        commit_hook(name)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a uniquely named temporary file and a rename, so two
    writers never share a temporary file and a reader never sees half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=_staging_prefix(), suffix=".tmp", dir=path.resolve().parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        with signals_deferred():
            os.replace(tmp, path)
            _publish(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_figure_atomic(figure: Any, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Save a matplotlib ``figure`` to ``path`` (format from the suffix, PNG without one) and
    close it; a plot that fails half-way leaves no file and an older one intact."""
    import matplotlib.pyplot as plt

    path = Path(path)
    staging = Staging(path)
    try:
        figure.savefig(staging.path, dpi=dpi, format=path.suffix.lstrip(".").lower() or "png")
        staging.commit()
    finally:
        staging.discard()
        plt.close(figure)
    return path
