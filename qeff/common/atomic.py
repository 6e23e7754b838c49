"""The one atomic writer: files appear at their destination complete or not at all.

:class:`Staging` is a temporary folder beside the destination (same file system, so the final
step is a rename). The caller writes the main file and its companions (a model's ``.data``)
into it; ``commit`` moves the companions first and the main file last, so the main file
appearing is what marks the output done, and a companion the new output does not have is
removed from the destination (a stale one would mislead readers). Anything not committed is
removed. :func:`write_text_atomic` does the same for one small text file.
"""

from __future__ import annotations

__all__ = ["Staging", "write_text_atomic"]

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path


class Staging:
    """``Staging(destination)``: ``path`` is where to write the main file, ``folder`` the rest."""

    def __init__(self, destination: str | os.PathLike) -> None:
        self.destination = Path(destination)
        self.parent = self.destination.resolve().parent
        self.folder = Path(tempfile.mkdtemp(prefix=f".{self.destination.name}.", suffix=".tmp", dir=self.parent))
        self.path = self.folder / self.destination.name

    def commit(self, companions: Sequence[str] = ()) -> Path:
        """Move ``companions`` (file names) then the main file into place; returns the destination."""
        moved = []
        try:
            for name in companions:
                staged = self.folder / name
                if staged.exists():
                    os.replace(staged, self.parent / name)
                    moved.append(self.parent / name)
                else:
                    (self.parent / name).unlink(missing_ok=True)
            os.replace(self.path, self.parent / self.destination.name)
        except BaseException:
            for path in moved:  # without the new main file they belong to nothing
                path.unlink(missing_ok=True)
            raise
        finally:
            self.discard()
        return self.destination

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a uniquely named temporary file and a rename, so two
    writers never share a temporary file and a reader never sees half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.resolve().parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
