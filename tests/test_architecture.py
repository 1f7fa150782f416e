"""The shape of the code: no import circle, layers that hold (stages never import each other, the core imports no
stage), one owner of the run-folder layout, and short functions (read off the source with ast, nothing imported).

The layers, bottom up: `specialist.core` (what counts as a right answer, intervals, gates: imports no stage), the
shared root modules (config, run_folder, generation, artifacts, classify, logits, ...: import no stage but data/),
the stages data/ (the bottom stage, which anyone may import), train/, evaluate/ and deploy/ (each imports the
core, the shared modules and data/, never another stage), and on top cli and pipeline, which wire the stages."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "src" / "specialist"
# file names of the run folder ("adapter" and "model", its other two folders, are also ordinary words: the
# export format, the config section; "tensorboard" is also a logger's name)
RUN_FOLDER_FILES = {"config.yaml", "manifest.json", "template.json", "metrics.jsonl", "metrics.json", "eval.json",
                    "predictions.jsonl", "loss.png", "report.html", "report.md", "export.json", "export_check.json",
                    "checkpoints", "figures", "Modelfile", "labels.json", "retrieval.json",
                    "promotion.json", "trackers.json"}
# the prepared-data folder (data/ in a run, or `specialist prepare --out`) is the data stage's own layout
OWNED_ELSEWHERE = {("manifest.json", "data/prepare.py")}
MAX_FUNCTION_LINES = 60
# Parameters a function may take, self/cls not counted and *args/**kwargs counted as one each (so that neither
# hides a long list). More than this and the call sites stop saying what they pass: group them in a small
# dataclass (a TrainJob, ExportOptions, Measuring). Typer commands are exempt: their parameters are the CLI's
# options, and the signature is their documentation.
MAX_PARAMETERS = 7
# Known offenders, each with why it is still here; the test fails when one is fixed, so the list only shrinks.
# Empty: serve.record, the last one, takes what the client asked as one value (Asked).
PARAMETER_CAP_WAIVERS: dict[str, int] = {}
STAGES = ("data", "train", "evaluate", "deploy")
BOTTOM_STAGE = "data"  # every layer above it may import it
TOP = ("cli", "pipeline")  # they wire the stages together, so they may import every one


def module_name(path: Path, source: Path = SOURCE) -> str:
    parts = path.relative_to(source.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(source: Path = SOURCE) -> dict[str, ast.Module]:
    """Every module of the package at `source` (a copy in a test that plants a fault), parsed."""
    return {module_name(p, source): ast.parse(p.read_text(encoding="utf-8"), str(p))
            for p in sorted(source.rglob("*.py"))}


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


def import_graph(source: Path = SOURCE) -> dict[str, set[str]]:
    trees = modules(source)
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


def layer_of(module: str) -> str:
    """A module's layer: its stage or "core" (the first name under specialist), else its own root-module name."""
    return module.split(".")[1] if module.count(".") >= 1 else module


def layer_violations(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(importer, imported) pairs that break the layers: a stage importing another stage (data/ excepted), the core
    importing a stage or the top, a shared root module importing a stage other than data/ or the top."""
    found = []
    for importer, targets in graph.items():
        here = layer_of(importer)
        for target in targets:
            there = layer_of(target)
            if here in TOP or there == here:
                continue
            if there in TOP or (there in STAGES and there != BOTTOM_STAGE):
                found.append((importer, target))
            elif here == "core" and there == BOTTOM_STAGE:
                found.append((importer, target))
    return sorted(found)


def test_the_layer_check_catches_a_planted_function_local_stage_import():
    known = {"specialist.train.sft", "specialist.train.common", "specialist.evaluate.runner", "specialist.data",
             "specialist.core.scorers", "specialist.config", "specialist.cli"}
    planted = ast.parse("from specialist.data import Example\nfrom specialist.core.scorers import score_rows\n\n\n"
                        "def fit():\n    if True:\n        from specialist.evaluate.runner import evaluate_run\n"
                        "    from .common import run_trainer\n")
    graph = {"specialist.train.sft": imported("specialist.train.sft", planted, known)}
    assert layer_violations(graph) == [("specialist.train.sft", "specialist.evaluate.runner")]
    # the core and the shared root modules are held too; the top may import anything
    assert layer_violations({"specialist.core.scorers": {"specialist.data"},
                             "specialist.config": {"specialist.evaluate.runner", "specialist.data"},
                             "specialist.cli": {"specialist.evaluate.runner", "specialist.train.sft"}}) == [
        ("specialist.config", "specialist.evaluate.runner"), ("specialist.core.scorers", "specialist.data")]


def test_a_function_local_stage_import_planted_in_a_copy_of_the_package_fails_the_layer_rule(tmp_path):
    # the whole rule end to end, on the real tree: the same walk the test below runs, after one planted line each
    copy = tmp_path / "specialist"
    shutil.copytree(SOURCE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert layer_violations(import_graph(copy)) == []
    plants = {"train/sft.py": "from specialist.evaluate.runner import evaluate_run",
              "evaluate/report.py": "from ..deploy import serve",
              "core/stats.py": "import specialist.train.loop"}
    for where, line in plants.items():
        with (copy / where).open("a", encoding="utf-8") as handle:
            handle.write(f"\n\ndef _planted():\n    if True:\n        {line}\n")
    assert layer_violations(import_graph(copy)) == [
        ("specialist.core.stats", "specialist.train.loop"), ("specialist.evaluate.report", "specialist.deploy"),
        ("specialist.evaluate.report", "specialist.deploy.serve"), ("specialist.train.sft", "specialist.evaluate.runner")]


def test_stages_never_import_each_other_and_the_core_imports_no_stage():
    graph = import_graph()
    assert any(layer_of(m) == "core" for m in graph) and all(any(layer_of(m) == s for m in graph) for s in STAGES)
    assert layer_violations(graph) == []


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


def parameter_count(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Parameters a caller may pass: positional, keyword-only, and *args / **kwargs as one each; not self or cls."""
    args = node.args
    names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
    if names and names[0] in ("self", "cls"):
        names = names[1:]
    return len(names) + (args.vararg is not None) + (args.kwarg is not None)


def is_cli_command(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """Decorated `@app.command(...)` (Typer): its parameters are the command line's options."""
    for decorator in node.decorator_list:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        if isinstance(target, ast.Attribute) and target.attr == "command":
            return True
    return False


def parameter_offenders(tree: ast.Module, where: str) -> dict[str, int]:
    return {f"{where} {node.name}": parameter_count(node) for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and parameter_count(node) > MAX_PARAMETERS and not is_cli_command(node)}


def test_the_parameter_count_sees_every_kind_of_parameter():
    planted = ast.parse("class A:\n    def m(self, a, b, /, c, *args, d, e, **kwargs): ...\n"
                        "@app.command()\ndef cli(a, b, c, d, e, f, g, h): ...\n"
                        "def long(a, b, c, d, e, f, g, h=1): ...\n")
    cli, long, method = sorted((n for n in ast.walk(planted) if isinstance(n, ast.FunctionDef)), key=lambda n: n.name)
    assert (parameter_count(method), parameter_count(cli), parameter_count(long)) == (7, 8, 8)
    assert parameter_offenders(planted, "x.py") == {"x.py long": 8}


def test_no_function_takes_more_than_seven_parameters():
    found: dict[str, int] = {}
    for path in sorted(SOURCE.rglob("*.py")):
        found |= parameter_offenders(ast.parse(path.read_text(encoding="utf-8")), str(path.relative_to(SOURCE)))
    assert found == PARAMETER_CAP_WAIVERS
