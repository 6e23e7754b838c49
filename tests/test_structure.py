"""The layout's rules, read from the sources with ``ast`` so they stay true.

- Stages import the contract and the shared helpers, never each other: the pipeline order
  (frontend → passes → backend_aic → runtime) is carried by files on disk, not by imports.
- The passes never import torch (or anything that imports it behind their back).
- What sits above the stages (``qeff.verify``, ``qeff.optimizer``, ``qeff.tune``, the CLI, the demos) may
  import them; nothing in a stage imports it.
- The KV cache input name is spelled in the contract module and nowhere else.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"frontend": "qeff.frontend", "passes": "qeff.passes", "backend_aic": "qeff.backend_aic",
          "runtime": "qeff.runtime"}
SHARED = ("qeff.contract", "qeff.errors", "qeff.common")
ABOVE = ("qeff.verify", "qeff.evaluation", "qeff.reference", "qeff.optimizer", "qeff.cli", "qeff.demo",
         "qeff.demo_encoder", "qeff.demo_reference", "qeff.tune")
# Imported by a module of a stage: another stage, anything above the stages, and for the
# passes torch and onnxruntime's tools package (whose __init__ imports torch).
FORBIDDEN = {
    stage: tuple(m for m in STAGES.values() if m != module) + ABOVE
    for stage, module in STAGES.items()
}
FORBIDDEN["passes"] += ("torch", "transformers", "onnxruntime.tools")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    top = rel.parts[0]
    package = STAGES.get(top, "qeff" if top == "qeff" else top)
    parts = [*package.split("."), *rel.parts[1:]] if top in STAGES else list(rel.parts)
    parts[-1] = parts[-1][: -len(".py")]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth of its code, relative imports resolved."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            found.add(name)
            found.update(f"{name}.{alias.name}" for alias in node.names)
    return found


def _violations(stage: str) -> list[str]:
    bad = []
    for path in _sources(stage):
        for name in _imports(path):
            for forbidden in FORBIDDEN[stage]:
                if name == forbidden or name.startswith(forbidden + "."):
                    bad.append(f"{path.relative_to(ROOT)} imports {name}")
    return bad


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_stage_imports_no_other_stage(stage):
    assert _violations(stage) == []


def test_shared_modules_import_no_stage():
    shared = [ROOT / "qeff" / "contract.py", ROOT / "qeff" / "errors.py", *_sources("qeff/common")]
    bad = [f"{p.relative_to(ROOT)} imports {name}" for p in shared for name in _imports(p)
           if name.startswith(tuple(STAGES.values()) + ABOVE)]
    assert bad == []


def test_the_rules_would_catch_a_backward_import(tmp_path):
    """The checker itself: a passes module importing the runtime or torch is reported."""
    probe = ROOT / "passes" / "_structure_probe.py"
    probe.write_text("import torch\nfrom qeff.runtime import OrtSession\nfrom ..runtime import generate\n")
    try:
        bad = _violations("passes")
    finally:
        probe.unlink()
    assert {b.split(" imports ")[1] for b in bad} >= {"torch", "qeff.runtime", "qeff.runtime.OrtSession"}


def test_the_cache_input_name_is_spelled_once():
    spelled = [p.relative_to(ROOT).as_posix() for p in _sources("qeff", *STAGES, "bench")
               if "past_key" in p.read_text()]
    assert spelled == ["qeff/contract.py"]
