"""The CLI as a user meets it: exit codes, messages without tracebacks, a full run."""

import json

import yaml
from typer.testing import CliRunner

from specialist.cli import app

runner = CliRunner()


def test_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("run", "validate", "models"):
        assert command in result.output


def test_bad_config_exits_2_with_the_key_path_and_no_traceback(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"data": {"path": "d.jsonl"}, "training": {"epoch": 2}}))
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert "training.epoch: unknown key; did you mean 'epochs'?" in result.output
    assert "Traceback" not in result.output


def test_validate_reports_bad_data_lines(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"prompt": "a", "completion": "b"}\nnot json\n')
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"data": {"path": "d.jsonl"}}))
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert "d.jsonl:2: malformed JSON" in result.output.replace("\n", "")


def test_prepare_writes_a_folder_a_run_can_train_on(tiny_config, tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tiny_config))
    result = runner.invoke(app, ["prepare", str(path), "--out", str(tmp_path / "prepared")], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "rows per step" in result.output and "tokens per row" in result.output
    report = json.loads((tmp_path / "prepared" / "report.json").read_text())
    assert report["rows_read"] == 40 and report["lengths"]["total"]["max"] > 0
    tiny_config["data"]["path"] = str(tmp_path / "prepared")
    path.write_text(yaml.safe_dump(tiny_config))
    result = runner.invoke(app, ["train", str(path), "--max-steps", "1"], terminal_width=200)
    assert result.exit_code == 0, result.output
    run_data = tmp_path / "runs" / "tiny" / "data"
    assert (run_data / "train.jsonl").read_bytes() == (tmp_path / "prepared" / "train.jsonl").read_bytes()


def test_models_says_where_the_empty_cache_is():
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0 and "no cached models" in result.output


def test_run_prints_the_before_after_table_and_report_path(tiny_config, tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tiny_config))
    result = runner.invoke(app, ["run", str(path), "--max-steps", "1", "--set", "evaluation.samples_in_report=1"],
                           terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "json_valid" in result.output and "exact_match" in result.output and "field_accuracy" in result.output
    assert "report.html" in result.output
    run_dir = tmp_path / "runs" / "tiny"
    assert json.loads((run_dir / "metrics.json").read_text())["train"]["steps"] == 1
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["training"]["max_steps"] == 1



def test_run_names_come_from_the_recipe_folder_and_the_config_variant(tmp_path):
    from specialist.cli import config_name

    recipe = tmp_path / "safety-refusals"
    recipe.mkdir()
    assert config_name(recipe / "config.yaml") == "safety-refusals"
    assert config_name(recipe / "config-grpo.yaml") == "safety-refusals-grpo"
    assert config_name(recipe / "config-.yaml") == "config-"
    assert config_name(recipe / "my-run.yaml") == "my-run"
