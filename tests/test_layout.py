"""The package's shape: stage sub-packages with a reading map, imports that only flow forward, public paths.

The stages, in pipeline order. A module may import from its own stage, from an earlier one and from
the shared top-level modules it needs (`errors`, `dist`), never from a later stage: a learner can
then read the stages in order and never meet a name from a chapter ahead. `cli` and `demo` sit on
top of everything. Imports inside functions count: they are still dependencies.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import minicodeparrot

PACKAGE = Path(minicodeparrot.__file__).parent
STAGES = ["sources", "tokenizer", "data", "model", "training", "evaluation"]
SHARED = {"errors", "dist"}  # importable from every stage
TOP = {"cli", "demo", "__main__", "__init__"}  # import anything, imported by nothing in a stage


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """The minicodeparrot modules `path` imports (top level or inside functions), without the prefix."""
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "minicodeparrot":
            base = node.module.removeprefix("minicodeparrot").lstrip(".")
            for alias in node.names:  # `from minicodeparrot.x import y` may name the module x.y
                sub = f"{base}.{alias.name}" if base else alias.name
                deps.add(sub if (PACKAGE / sub.replace(".", "/")).with_suffix(".py").exists()
                         or (PACKAGE / sub.replace(".", "/")).is_dir() else base)
        elif isinstance(node, ast.Import):
            deps.update(a.name.removeprefix("minicodeparrot.") for a in node.names
                        if a.name.startswith("minicodeparrot."))
    return {d for d in deps if d}


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def _stage(module: str) -> int | None:
    head = module.split(".")[0]
    return STAGES.index(head) if head in STAGES else None


def test_top_level_holds_at_most_six_loose_modules():
    loose = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(loose) <= 6, loose
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()} >= set(STAGES)


def test_every_stage_package_has_a_reading_map():
    for stage in STAGES:
        doc = ast.get_docstring(ast.parse((PACKAGE / stage / "__init__.py").read_text())) or ""
        assert "Read in this order" in doc and "Skip on a first reading" in doc, stage
        listed = {line.split("`")[1] for line in doc.splitlines() if line.strip()[:2].rstrip(".").isdigit()
                  and "`" in line}
        files = {p.name for p in (PACKAGE / stage).glob("*.py")} - {"__init__.py"}
        named = {f for f in files if f in doc}
        assert listed <= files | {f + "/" for f in ["fast"]}, (stage, listed - files)
        assert named == files, (stage, files - named)  # every file is placed somewhere in the map


def test_imports_only_flow_forward_through_the_stages():
    backwards = []
    for module, deps in _graph().items():
        if module.split(".")[0] in TOP:
            continue
        for dep in deps:
            if dep.split(".")[0] in TOP:
                backwards.append((module, dep))
            elif _stage(module) is not None and _stage(dep) is not None and _stage(dep) > _stage(module):
                backwards.append((module, dep))
            elif _stage(module) is None and _stage(dep) is not None:  # errors/dist import no stage
                backwards.append((module, dep))
    assert backwards == []


def test_no_import_cycles():
    graph = _graph()

    def reaches(start: str, goal: str, seen: frozenset) -> bool:
        return any(d == goal or (d in graph and d not in seen and reaches(d, goal, seen | {d}))
                   for d in graph[start])

    assert [m for m in graph if reaches(m, m, frozenset())] == []


def test_public_paths_keep_working():
    from minicodeparrot.model import GPT, GPTConfig
    from minicodeparrot.tokenizer import Tokenizer

    assert Tokenizer.__module__ == "minicodeparrot.tokenizer.bpe"
    assert GPT.__module__ == GPTConfig.__module__ == "minicodeparrot.model.gpt"
    out = subprocess.run([sys.executable, "-m", "minicodeparrot", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for command in ["train", "train-tokenizer", "preprocess", "pretokenize", "generate", "humaneval", "demo"]:
        assert command in out
