"""Every example folder: its config validates against its bundled data, its NOTICE is there, and where the
licensed sources are at hand (../shared/datasets, not needed at run time), its builder reproduces the data
(the domain-adaptation builder reads this Python's docstrings and the git history instead; it is skipped
where those differ)."""

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from specialist.cli import app

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"
RECIPES = sorted(p.parent for p in (REPO / "examples").glob("*/build_data.py"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_configs_validate_against_their_data(recipe):
    notice = (recipe / "NOTICE").read_text(encoding="utf-8")
    assert "Source" in notice and ("Licen" in notice or "LICENSE" in notice) and "Citation" in notice
    for config in sorted(recipe.glob("config*.yaml")):
        result = CliRunner().invoke(app, ["validate", str(config)], terminal_width=200)
        assert result.exit_code == 0, f"{config}: {result.output}"


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_builders_reproduce_the_bundled_data(recipe, tmp_path):
    if not SHARED.is_dir() and '"shared"' in (recipe / "build_data.py").read_text(encoding="utf-8"):
        pytest.skip(f"{SHARED} is not here; the bundled data is checked by the config test")
    out = tmp_path / "data.jsonl"
    built = subprocess.run([sys.executable, str(recipe / "build_data.py"), "--out", str(out)], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    if built.returncode == 3:  # the builder's sources are not these (another Python, no git history)
        pytest.skip(built.stderr.strip())
    assert built.returncode == 0, built.stderr
    assert out.read_bytes() == (recipe / "data.jsonl").read_bytes()
    for extra in ("questions.jsonl", "preferences.jsonl", "schema-catalog.json"):  # beside data.jsonl, by some
        if (recipe / extra).is_file():
            assert (tmp_path / extra).read_bytes() == (recipe / extra).read_bytes(), extra
