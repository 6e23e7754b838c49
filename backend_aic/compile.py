"""Lowering a rewritten model to a QPC: write the compile files, run the compiler, keep its log."""

from __future__ import annotations

__all__ = ["CompileResult", "compile_model", "QPC_MARKER"]

import dataclasses
import hashlib
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from qeff.backend_aic.compiler import build_command, find_compiler
from qeff.backend_aic.files import (
    custom_io_yaml,
    mdp_json,
    prefill_count,
    specializations,
    specializations_json,
)
from qeff.backend_aic.model_info import read_file_beside_model, read_model_info
from qeff.backend_aic.options import CompileOptions, ResolvedOptions, check_options, resolve_options
from qeff.contract import (
    COMMAND_NAME,
    CUSTOM_IO_NAME,
    LOG_NAME,
    PARAMS_NAME,
    QPC_DIR,
    QPC_MARKER,
    SPECIALIZATIONS_NAME,
    mdp_name,
)
from qeff.errors import QeffError

logger = logging.getLogger(__name__)

_TAIL_LINES = 20


@dataclasses.dataclass
class CompileResult:
    folder: Path
    command: list[str]
    hash: str
    status: str  # "compiled", "cached", "dry-run"
    seconds: float = 0.0
    files: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def qpc(self) -> Path:
        return self.folder / QPC_DIR

    @property
    def command_text(self) -> str:
        return shlex.join(self.command)


def _first_missing(folder: Path) -> Path | None:
    """The outermost folder of ``folder`` and its parents that does not exist yet (None: it exists)."""
    missing = None
    for path in (folder, *folder.parents):
        if os.path.lexists(path):
            break
        missing = path
    return missing


def _remove_created(created: Path | None) -> None:
    if created is not None:
        shutil.rmtree(created, ignore_errors=True)


def _prepare_folder(folder: Path) -> Path | None:
    """Create the compile folder (and the parents it needs) and check it can be written; returns
    the outermost folder created, so a refusal before the compiler starts can take it back."""
    created = _first_missing(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".qeff-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        _remove_created(created)
        raise QeffError(f"cannot write the compile folder {folder}: {e.strerror or e}",
                        "choose a folder you can write with -o") from None
    return created


def _model_identity(path: Path) -> dict[str, Any]:
    """Size and modification time of the model and its data files: a changed model recompiles."""
    files = [path] + sorted(p for p in path.parent.glob(f"{path.name}*.data"))
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files if p.exists()}


def _compose_files(info: Any, o: ResolvedOptions) -> tuple[dict[str, str], dict[str, str]]:
    """The compiler's input files, not yet written: (kind -> file name, file name -> text).
    Everything that can refuse the compile happens here, before the compile folder is touched."""
    names: dict[str, str] = {}
    texts: dict[str, str] = {}
    specs = specializations(info, o)
    if specs and specs[0]:
        names["specializations"] = SPECIALIZATIONS_NAME
        texts[SPECIALIZATIONS_NAME] = specializations_json(specs, o.specializations_format, prefill_count(info))
    if info.has_kv or o.custom_io:
        names["custom_io"] = CUSTOM_IO_NAME
        texts[CUSTOM_IO_NAME] = custom_io_yaml(info, o.kv_precision, o.custom_io)
    if len(o.devices) > 1:
        names["mdp"] = mdp_name(len(o.devices))
        texts[names["mdp"]] = mdp_json(len(o.devices), o.num_cores)
    if o.node_precision_info is not None:
        names["node_precision_info"] = "node_precision_info.yaml"
        texts["node_precision_info.yaml"] = read_file_beside_model(info.path, "node_precision_info",
                                                                   o.node_precision_info)
    return names, texts


def compile_model(model: str | os.PathLike, output: str | os.PathLike, options: CompileOptions | None = None,
                  *, console: Any = None) -> CompileResult:
    """Write the compile folder for ``model`` and (unless a dry run) compile it into ``output/qpc``.

    An identical compile (same parameters hash, ``qpc/programqpc.bin`` present) is skipped; a
    ``qpc/`` without ``programqpc.bin`` is a failed compile and is redone. Every check runs before
    the compile folder is created, and a compile folder this call created is removed again when
    writing it fails; once the compiler has started, the folder stays, with its log.
    """
    options = options or CompileOptions()
    check_options(options)
    info = read_model_info(model)
    resolved = resolve_options(options, info)
    compiler = find_compiler(options.compiler, required=not options.dry_run)
    folder = Path(output)
    names, texts = _compose_files(info, resolved)
    command = build_command(compiler, info, resolved, folder.resolve(), options.hw_version, names)
    params = {"command": command, "files": texts, "model": _model_identity(info.path),
              "options": dataclasses.asdict(resolved) | {"node_precision_info": str(resolved.node_precision_info)},
              "compiler": {"path": compiler.path, "flavour": compiler.flavour, "found": compiler.found},
              "devices": list(resolved.devices)}
    digest = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]
    created = _prepare_folder(folder)
    try:
        for name, text in texts.items():
            (folder / name).write_text(text)
        (folder / COMMAND_NAME).write_text(shlex.join(command) + "\n")
        result = CompileResult(folder=folder, command=command, hash=digest, status="dry-run", files=names)
        previous = _read_params(folder)
        marker = folder / QPC_MARKER
        if options.dry_run:
            _write_params(folder, params, digest, "dry-run")
            return result
        if previous.get("hash") == digest and previous.get("status") == "compiled" and marker.is_file():
            result.status = "cached"
            return result
        if (folder / "qpc").exists():
            logger.info("removing %s before compiling (%s)", folder / "qpc",
                        "no programqpc.bin: an earlier compile failed" if not marker.is_file() else "parameters changed")
            shutil.rmtree(folder / "qpc")
        _write_params(folder, params, digest, "compiling")
    except BaseException as e:
        _remove_created(created)
        if isinstance(e, OSError):
            raise QeffError(f"cannot write the compile folder {folder}: {e.strerror or e}",
                            "check the free space and the permissions of the folder given with -o") from None
        raise
    result.seconds = _run(command, folder, options.timeout, console)
    if not marker.is_file():
        raise QeffError(f"the compiler exited 0 but wrote no {QPC_MARKER} in {folder}",
                        f"see {folder / LOG_NAME}")
    _write_params(folder, params, digest, "compiled")
    result.status = "compiled"
    return result


def _read_params(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / PARAMS_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _write_params(folder: Path, params: dict[str, Any], digest: str, status: str) -> None:
    record = {"hash": digest, "status": status, **params}
    (folder / PARAMS_NAME).write_text(json.dumps(record, indent=2, default=str) + "\n")


def _tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").rstrip().splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-_TAIL_LINES:])


def _stop_group(process: subprocess.Popen) -> None:
    """Kill the compiler and every process it started (its process group), then reap it.

    Called only while the compiler has not been reaped, so its pid, which is the group's id,
    still names that group and no other."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    except OSError:  # the group cannot be signalled: at least stop the compiler itself
        process.kill()
    process.wait()


def _run(command: list[str], folder: Path, timeout: float | None, console: Any) -> float:
    """Run the compiler with its output in compile.log, a spinner and the elapsed time on screen."""
    log_path = folder / LOG_NAME
    start = time.perf_counter()
    with open(log_path, "wb") as log:
        try:
            # A session of its own makes the compiler the leader of a new process group that its
            # helper processes join, so a timeout or an interrupt stops all of them; it also keeps
            # the terminal's Ctrl-C from reaching them behind our back (we stop them ourselves).
            # stdin is closed: outside the terminal's foreground group a read would stop it.
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                       cwd=folder, start_new_session=True)
        except OSError as e:
            raise QeffError(f"cannot start the compiler {command[0]}: {e.strerror or e}",
                            "check --compiler, or use --dry-run") from None
        status = None
        try:
            status = console.status("compiling") if console is not None else None
            if status is not None:
                status.start()
            while process.poll() is None:
                elapsed = time.perf_counter() - start
                if status is not None:
                    status.update(f"compiling with {Path(command[0]).name} … {elapsed:.0f} s")
                if timeout is not None and elapsed > timeout:
                    _stop_group(process)
                    raise QeffError(f"the compiler did not finish within {timeout:g} s and was stopped "
                                    f"(log: {log_path})", "raise --timeout, or lower the compile's size")
                time.sleep(0.1)
        finally:
            try:
                if process.returncode is None:  # interrupted or failed while waiting: stop them all
                    _stop_group(process)
            finally:
                if status is not None:
                    status.stop()
    seconds = time.perf_counter() - start
    if process.returncode != 0:
        tail = _tail(log_path)
        raise QeffError(f"the compiler failed with exit code {process.returncode} after {seconds:.1f} s; "
                        f"last lines of {log_path}:\n{tail}", "fix what the log names, or see --dry-run for the command")
    return seconds
