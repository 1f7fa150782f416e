"""The shape of the code: no import circle, evaluate/ and deploy/ meet only through the shared modules, one owner of
the run-folder layout, and short functions (read off the source with ast, nothing imported)."""

from __future__ import annotations

import ast
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "src" / "specialist"
# file names of the run folder ("adapter" and "model", its other two folders, are also ordinary words: the
# export format, the config section; "tensorboard" is also a logger's name)
RUN_FOLDER_FILES = {"config.yaml", "manifest.json", "template.json", "metrics.jsonl", "metrics.json", "eval.json",
                    "predictions.jsonl", "loss.png", "report.html", "report.md", "export.json", "export_check.json",
                    "checkpoints", "figures", "Modelfile", "labels.json", "retrieval.json"}
# the prepared-data folder (data/ in a run, or `specialist prepare --out`) is the data stage's own layout
OWNED_ELSEWHERE = {("manifest.json", "data/prepare.py")}
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(encoding="utf-8"), str(p)) for p in sorted(SOURCE.rglob("*.py"))}


def imported(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """The specialist modules `name` imports, anywhere in its body (imports inside functions count too)."""
    found = set()
    package = name if name in known and any(k.startswith(name + ".") for k in known) else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    trees = modules()
    known = set(trees)
    return {name: imported(name, tree, known) for name, tree in trees.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_planted_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle_in_the_package():
    graph = import_graph()
    assert len(graph) > 40 and graph["specialist.cli"]  # the walk sees the package and its imports
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph))}"


def test_evaluate_and_deploy_meet_only_through_the_shared_modules():
    graph = import_graph()
    crossings = [(a, b) for a, targets in graph.items() for b in targets
                 if (a.startswith("specialist.evaluate") and b.startswith("specialist.deploy"))
                 or (a.startswith("specialist.deploy") and b.startswith("specialist.evaluate"))]
    assert crossings == []


def test_no_run_folder_file_name_outside_the_run_folder_module():
    offenders = []
    for path in sorted(SOURCE.rglob("*.py")):
        if path.name == "run_folder.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            where = str(path.relative_to(SOURCE))
            if (isinstance(node, ast.Constant) and node.value in RUN_FOLDER_FILES
                    and (node.value, where) not in OWNED_ELSEWHERE):
                offenders.append(f"{path.relative_to(SOURCE)}:{node.lineno} {node.value!r}")
    assert offenders == []


def test_no_function_over_sixty_lines():
    long = []
    for path in sorted(SOURCE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(SOURCE)}:{node.lineno} {node.name} ({length} lines)")
    assert long == []
