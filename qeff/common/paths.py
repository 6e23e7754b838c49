"""Checking where a command may write, before it does any work.

Every path a command writes (the model, ``--report``, ``--plot``, ``--stats-json``, ``--json``,
a demo's folder) goes through :func:`check_output_file` with the set of files the command must
not touch (its inputs, their data files and manifests, and its other outputs), so no option can
overwrite another file of the run, and a path that cannot be written fails before anything is.
"""

from __future__ import annotations

__all__ = ["check_output_file", "check_plot_file", "model_files", "NAME_MAX"]

import os
from collections.abc import Iterable
from pathlib import Path

from qeff.errors import OutputPathError, QeffError

# The longest file name most file systems take, in bytes.
NAME_MAX = 255


def model_files(model: str | os.PathLike) -> set[Path]:
    """An ONNX file and what belongs to it on disk: its data files (by the names qeff-opt and
    the exporters give them) and its manifest."""
    path = Path(model).resolve()
    stem = path.name[: -len(".onnx")] if path.name.endswith(".onnx") else path.name
    files = {path, path.with_name(stem + ".qeff.json")}
    try:
        files.update(p for p in path.parent.glob(f"{_glob_escape(path.name)}*.data"))
    except OSError:
        pass
    return {p.resolve() for p in files}


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def check_output_file(path: str | os.PathLike, what: str, protected: Iterable[str | os.PathLike] = (),
                      *, reserve: int = 0) -> Path:
    """Refuse ``path`` (named ``what`` in messages, e.g. "--report") when it is one of
    ``protected``, a folder, has no folder to go into, or a name too long to create
    (``reserve`` bytes are kept free for suffixes added to the name, e.g. a data file's)."""
    out = Path(path)
    if len(os.fsencode(out.name)) > NAME_MAX - reserve:
        raise OutputPathError(f"{what}: the file name {out.name[:40]}… is longer than the "
                              f"{NAME_MAX - reserve} bytes it may have", "choose a shorter name")
    resolved = out.resolve()
    for p in protected:
        if Path(p).resolve() == resolved:
            raise OutputPathError(f"{what} {out} would overwrite {p}, which this command reads or writes",
                                  f"choose another path for {what}")
    if out.is_dir():
        raise OutputPathError(f"{what} {out} is a folder", "give a file name")
    parent = resolved.parent
    if not parent.exists():
        raise OutputPathError(f"{what}: folder {out.parent} does not exist", "create it first")
    if not parent.is_dir():
        raise OutputPathError(f"{what}: {out.parent} is a file, not a folder", "choose a path inside a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"{what}: folder {out.parent} is not writable", "choose another path")
    return out


def check_plot_file(path: str | os.PathLike) -> None:
    """Fail before any work when a plot cannot be written there: an image type matplotlib
    writes (.png, .svg, .pdf), and matplotlib installed."""
    path = Path(path)
    if path.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise QeffError(f"--plot {path}: unknown image type", "name it .png, .svg or .pdf")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise QeffError("--plot needs matplotlib", "pip install matplotlib (or the package's [plot] extra)") from None
