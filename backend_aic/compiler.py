"""Finding the Cloud AI compiler and speaking its flavour (qaic-compile or the older qaic-exec)."""

from __future__ import annotations

__all__ = ["Compiler", "find_compiler", "DEFAULT_PATHS", "build_command"]

import dataclasses
import os
import shutil
from pathlib import Path

from qeff.backend_aic.model_info import ModelInfo
from qeff.backend_aic.options import ResolvedOptions
from qeff.errors import QeffError

DEFAULT_PATHS = ("/opt/qti-aic/exec/qaic-compile", "/opt/qti-aic/exec/qaic-exec")
# qaic-exec (SDKs before qaic-compile) wants -compile-only and the hardware version 2.0;
# qaic-compile takes ai100/ai200 and no -compile-only.
_HW_DEFAULT = {"compile": "ai100", "exec": "2.0"}


@dataclasses.dataclass(frozen=True)
class Compiler:
    path: str
    flavour: str  # "compile" or "exec"
    found: bool = True

    @property
    def default_hw_version(self) -> str:
        return _HW_DEFAULT[self.flavour]


def _flavour(path: str) -> str:
    return "exec" if Path(path).name.startswith("qaic-exec") else "compile"


def _executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def _locate(given: str) -> str | None:
    """The absolute path of the executable ``given`` names, or None.

    The compiler runs in the compile folder, so a relative path (``./qaic-compile``,
    ``sdk/qaic-compile``) is resolved here, against the caller's current folder; a bare name is
    looked up on PATH as a shell would, then in the current folder. Links are not resolved: the
    name tells the compiler's flavour (qaic-exec or qaic-compile)."""
    path = os.path.expanduser(given)
    separators = {os.sep} | ({os.altsep} if os.altsep else set())
    if not any(sep in path for sep in separators):
        on_path = shutil.which(path)
        if on_path:
            return os.path.abspath(on_path)
    candidate = os.path.abspath(path)
    return candidate if _executable(candidate) else None


def find_compiler(explicit: str | None = None, *, required: bool = True) -> Compiler:
    """``explicit`` (``--compiler``), else ``$QAIC_COMPILER``, else the SDK's qaic-compile, then
    qaic-exec, then qaic-compile on PATH. With ``required=False`` (a dry run) a missing compiler
    gives the default path, marked not found. A compiler that is found is named by its absolute path."""
    if explicit:
        located = _locate(explicit)
        if located is None:
            raise QeffError(f"--compiler {explicit} is not an executable file",
                            "give the path of qaic-compile (or qaic-exec), or use --dry-run")
        return Compiler(located, _flavour(located))
    searched = []
    env = os.environ.get("QAIC_COMPILER")
    if env:
        located = _locate(env)
        if located is not None:
            return Compiler(located, _flavour(located))
        searched.append(f"$QAIC_COMPILER={env}")
    for path in DEFAULT_PATHS:
        if _executable(path):
            return Compiler(path, _flavour(path))
        searched.append(path)
    on_path = shutil.which("qaic-compile")
    if on_path:  # absolute: a relative PATH entry means the caller's folder, not the compile folder
        return Compiler(os.path.abspath(on_path), "compile")
    searched.append("qaic-compile on PATH")
    if not required:
        return Compiler(DEFAULT_PATHS[0], "compile", found=False)
    raise QeffError(f"no Cloud AI compiler found (searched {', '.join(searched)})",
                    "install the Cloud AI SDK, point --compiler or QAIC_COMPILER at qaic-compile, "
                    "or use --dry-run to write the compile files and command without compiling")


def build_command(compiler: Compiler, info: ModelInfo, o: ResolvedOptions, folder: Path, hw_version: str | None,
                  files: dict[str, str]) -> list[str]:
    """The compiler's argument list, in the order of DESIGN §4; ``files`` maps the file kinds
    written (specializations, custom_io, mdp, node_precision_info) to their names in ``folder``."""
    cmd = [compiler.path, "-aic-hw", f"-aic-hw-version={hw_version or compiler.default_hw_version}",
           f"-m={info.path.resolve()}"]
    if compiler.flavour == "exec":
        cmd.append("-compile-only")
    if info.has_kv:
        cmd.append("-retained-state")
    if o.convert_to_fp16:
        cmd.append("-convert-to-fp16")
    if o.mxfp6:
        cmd.append("-mxfp6-matmul")
    if o.sub_functions:
        cmd.append("-sub-functions")
    cmd.append(f"-aic-num-cores={o.num_cores}")
    cmd.extend(f"-onnx-define-symbol={name},{value}" for name, value in o.define_symbols)
    if o.multicast_weights:
        cmd.append("-multicast-weights")
    if o.stats_batchsize is not None:
        cmd.append(f"-stats-batchsize={o.stats_batchsize}")
    if o.mos is not None:
        cmd.append(f"-mos={o.mos}")
    if o.ols is not None:
        cmd.append(f"-ols={o.ols}")
    if o.depth_first:
        cmd.append("-aic-enable-depth-first")
    if "mdp" in files:
        cmd.append(f"-mdp-load-partition-config={folder / files['mdp']}")
    if "node_precision_info" in files:
        cmd.append(f"-node-precision-info={folder / files['node_precision_info']}")
    cmd.extend(o.extra_flags)
    if "specializations" in files:
        cmd.append(f"-network-specialization-config={folder / files['specializations']}")
    if "custom_io" in files:
        cmd.append(f"-custom-IO-list-file={folder / files['custom_io']}")
    cmd.append(f"-aic-binary-dir={folder / 'qpc'}")
    return cmd
