"""qeff.backend_aic: lowering rewritten models to the Cloud AI 100 compiler (DESIGN §4).

``compile_model(model, folder, CompileOptions(...))`` writes ``specializations.json``,
``custom_io.yaml``, the multi-device partition JSON and the node-precision YAML (when the model's
manifest names one), the exact command (``command.txt``) and the parameters with their hash
(``qeff-compile.json``), then runs ``qaic-compile`` (or the older ``qaic-exec``) into
``folder/qpc`` with its output in ``compile.log``. ``dry_run`` stops before running it.

Options and the manifest are checked before anything is written (a refusal leaves no compile
folder behind); a file the manifest names must be a regular file in the model's own folder. The
compiler runs in a process group of its own, which a timeout or an interrupt stops as a whole.
"""

from qeff.backend_aic.compile import QPC_MARKER, CompileResult, compile_model
from qeff.backend_aic.compiler import DEFAULT_PATHS, Compiler, find_compiler
from qeff.backend_aic.model_info import ModelInfo, read_model_info
from qeff.backend_aic.options import KV_PRECISIONS, SPECIALIZATION_FORMATS, CompileOptions

__all__ = [
    "compile_model",
    "CompileOptions",
    "CompileResult",
    "Compiler",
    "find_compiler",
    "read_model_info",
    "ModelInfo",
    "DEFAULT_PATHS",
    "KV_PRECISIONS",
    "SPECIALIZATION_FORMATS",
    "QPC_MARKER",
]
