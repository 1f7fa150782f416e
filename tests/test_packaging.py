"""pyproject.toml declares what src/ imports: a plain `pip install specialist` must not depend on what happened to
be installed beside it (numpy, xxhash, pyarrow and huggingface_hub once came only through other packages)."""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "specialist"
# import names of optional packages that need not be installed here, so packages_distributions() cannot map them
NOT_INSTALLED_HERE = {"bitsandbytes": "bitsandbytes", "llama_cpp": "llama-cpp-python", "xgrammar": "xgrammar",
                      "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio", "comet_ml": "comet_ml"}
# modules that only run with an extra installed, and may import it at module scope (serve_requests.py is
# imported by serve.py alone, so it is only ever loaded where fastapi is)
EXTRA_MODULES = {"deploy/serve.py": "serve", "deploy/serve_requests.py": "serve"}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def declared() -> dict[str, set[str]]:
    """Each group (`core`, then every extra) and the distributions it names."""
    project = pyproject()["project"]
    groups = {"core": project["dependencies"], **project["optional-dependencies"]}
    return {group: {normalise(Requirement(r).name) for r in requirements} for group, requirements in groups.items()}


def third_party_imports(module_scope_only: bool) -> dict[str, set[str]]:
    """{top-level import name: the src files importing it}, standard library and specialist itself left out."""
    found: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body if module_scope_only else ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "specialist":
                    found.setdefault(top, set()).add(path.relative_to(SRC).as_posix())
    return found


@functools.cache
def installed_distributions() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()  # scans every installed package: once per session


def distribution_of(import_name: str) -> str:
    installed = installed_distributions().get(import_name)
    if installed:
        return normalise(installed[0])
    assert import_name in NOT_INSTALLED_HERE, f"{import_name} is neither installed nor known to this test"
    return normalise(NOT_INSTALLED_HERE[import_name])


def test_every_third_party_import_in_src_is_declared():
    everything = set().union(*declared().values())
    missing = {name: sorted(files) for name, files in third_party_imports(module_scope_only=False).items()
               if distribution_of(name) not in everything}
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_module_scope_imports_are_core_dependencies_or_the_modules_own_extra():
    # an import at module scope runs whenever the module is imported: it must come with `pip install specialist`
    groups = declared()
    wrong = {}
    for name, files in third_party_imports(module_scope_only=True).items():
        for file in files:
            allowed = groups["core"] | groups.get(EXTRA_MODULES.get(file, "core"), set())
            if distribution_of(name) not in allowed:
                wrong[file] = name
    assert not wrong, f"module-scope imports outside the core dependencies: {wrong}"


@pytest.mark.parametrize("package", ["transformers", "trl"])
def test_transformers_and_trl_are_capped_below_the_next_major(package):
    # train/ overrides private Trainer methods: a new major may rename them, so it is opted into, not inherited
    requirement = next(Requirement(r) for r in pyproject()["project"]["dependencies"]
                       if normalise(Requirement(r).name) == package)
    installed = Version(importlib.metadata.version(package))
    assert installed in requirement.specifier, f"{package} {installed} (tested) is outside {requirement}"
    assert Version(f"{installed.major + 1}.0") not in requirement.specifier


def test_the_code_extra_brings_what_the_sandboxed_code_scorers_import():
    extras = pyproject()["project"]["optional-dependencies"]
    assert {"pytest", "pluggy"} <= declared()["code"]
    # `make test` installs test-tools, not test: that is the extra that must pull code in
    assert any(Requirement(r).name == "specialist" and "code" in Requirement(r).extras for r in extras["test-tools"])


def test_every_extra_the_readme_names_exists():
    # the README's install section is how pip users choose extras: a renamed extra must not leave it stale
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    named = {extra for group in re.findall(r"(?:specialist|\.)\[([\w,-]+)\]", readme) for extra in group.split(",")}
    in_table = set(re.findall(r"`([\w-]+)`", readme.split("## Install with pip")[1].split("\n## ")[0]))
    extras = set(pyproject()["project"]["optional-dependencies"])
    assert named - extras == set(), f"the README names extras pyproject.toml does not define: {named - extras}"
    assert extras - {"test-tools"} <= in_table, f"extras missing from the install section: {extras - in_table}"


def makefile_recipe(target: str) -> str:
    """The prerequisites and commands of a Makefile rule, up to the blank line that ends it."""
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    return makefile.split(f"\n{target}:", 1)[1].split("\n\n", 1)[0]


def distributions_of(extras: set[str]) -> set[str]:
    """The distributions the extras install, `specialist[...]` references to other extras followed."""
    groups = pyproject()["project"]["optional-dependencies"]
    found, todo, seen = set(), list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for requirement in map(Requirement, groups[extra]):
            if normalise(requirement.name) == "specialist":
                todo += requirement.extras
            else:
                found.add(normalise(requirement.name))
    return found


def test_ci_installs_the_clients_the_serve_tests_drive_and_makes_a_missing_one_fail():
    # .ci/run is `make test`; its test stamp installs these extras, and the constrain stamp (a prerequisite)
    # xgrammar, which test_serve_api.py needs before its openai and LangChain tests can run
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "make test" in ci and re.search(r'^export CI="\$\{CI:-1\}"', ci, re.MULTILINE), ci
    assert "$(TEST_STAMP)" in makefile_recipe("test").split("\n", 1)[0]
    stamp = makefile_recipe("$(TEST_STAMP)")
    assert "$(CONSTRAIN_STAMP)" in stamp.split("\n", 1)[0] and "xgrammar" in makefile_recipe("$(CONSTRAIN_STAMP)")
    installed = set(re.search(r"-e '\.\[([\w,-]+)\]'", stamp).group(1).split(","))
    assert {"openai", "langchain-openai"} <= distributions_of(installed), installed


def test_require_skips_on_a_developers_machine_and_fails_under_ci(monkeypatch):
    from conftest import require

    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        require("specialist_no_such_module", "absent here")
    for value in ("1", "true"):
        monkeypatch.setenv("CI", value)
        with pytest.raises(ModuleNotFoundError):
            require("specialist_no_such_module", "absent here")
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception):
        require("specialist_no_such_module", "absent here")
    assert require("json", "the standard library").dumps([]) == "[]"


def test_a_module_needing_an_extra_is_imported_at_module_scope_only_by_modules_needing_it_too():
    # EXTRA_MODULES may import their extra at module scope because nothing loads them without it: a core module
    # importing one at the top would make `import specialist...` need fastapi after all
    wrong = {}
    for path in SRC.rglob("*.py"):
        importer = path.relative_to(SRC).as_posix()
        package = importer.split("/")[:-1]
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if not isinstance(node, ast.ImportFrom) or not node.module:
                continue
            if node.level:  # relative: from the importer's package, one level up per extra dot
                parts = package[:len(package) - node.level + 1] + node.module.split(".")
            elif node.module.startswith("specialist."):
                parts = node.module.split(".")[1:]
            else:
                continue
            target = "/".join(parts) + ".py"
            if target in EXTRA_MODULES and EXTRA_MODULES.get(importer) != EXTRA_MODULES[target]:
                wrong[importer] = target
    assert not wrong, f"modules that need an extra, imported at module scope by modules that do not: {wrong}"
