from pathlib import Path

import pytest
import yaml

from specialist.config import RunConfig, load_config, validate_config
from specialist.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, data) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_minimal_config_fills_laptop_defaults():
    config = validate_config({"data": {"path": "d.jsonl"}})
    assert config.model.name == "gemma-3-270m"
    assert config.method.kind == "lora" and config.method.target_modules == "all-linear"
    assert config.training.completion_only_loss is True


def test_unknown_key_is_rejected_with_its_path_and_a_suggestion():
    with pytest.raises(ConfigError) as err:
        validate_config({"data": {"path": "d.jsonl"}, "training": {"learning_rte": 0.1}})
    message = str(err.value)
    assert "training.learning_rte: unknown key" in message
    assert "did you mean 'learning_rate'" in message


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        validate_config({"data": {"path": "d.jsonl"}, "training": {"epochs": -1, "batch_size": 0},
                         "method": {"kind": "magic"}})
    message = str(err.value)
    assert "3 problem(s)" in message
    assert "training.epochs" in message and "training.batch_size" in message
    assert "method.kind" in message and "'lora'" in message


def test_missing_data_section_is_named():
    with pytest.raises(ConfigError, match="data: required key is missing"):
        validate_config({})


def test_fractions_that_leave_no_training_rows_are_rejected():
    with pytest.raises(ConfigError, match="val_fraction \\+ test_fraction"):
        validate_config({"data": {"path": "d.jsonl", "val_fraction": 0.5, "test_fraction": 0.45}})


def test_overrides_are_typed_and_win_over_the_file(tmp_path):
    path = write(tmp_path, {"data": {"path": "d.jsonl"}, "training": {"epochs": 1}})
    config = load_config(path, ["training.epochs=3", "method.target_modules=[q_proj, v_proj]", "model.name=x/y"])
    assert config.training.epochs == 3
    assert config.method.target_modules == ["q_proj", "v_proj"]
    assert config.model.name == "x/y"


def test_data_path_resolves_relative_to_the_config_file(tmp_path):
    path = write(tmp_path, {"data": {"path": "d.jsonl"}})
    assert load_config(path).data.path == (tmp_path / "d.jsonl").resolve()


def test_a_path_typed_in_an_override_resolves_from_the_working_directory(tmp_path, monkeypatch):
    """`--set method.from_adapter=runs/sft/adapter` means the runs/ where the command was typed, not one beside
    the config; the same key written in the file stays relative to the file."""
    configs, workdir = tmp_path / "examples" / "job", tmp_path / "work"
    configs.mkdir(parents=True)
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    path = write(configs, {"data": {"path": "d.jsonl"}, "method": {"kind": "grpo", "from_adapter": "in-file"},
                           "evaluation": {"json_schema": "schema.json"}})
    typed = load_config(path, ["method.from_adapter=runs/sft/adapter", "data.test_path=held-out.jsonl"])
    assert typed.method.from_adapter == (workdir / "runs/sft/adapter").resolve()
    assert typed.data.test_path == (workdir / "held-out.jsonl").resolve()
    assert typed.data.path == (configs / "d.jsonl").resolve()  # not overridden: still beside the config
    assert typed.evaluation.json_schema == (configs / "schema.json").resolve()
    assert load_config(path).method.from_adapter == (configs / "in-file").resolve()


def test_malformed_override_names_the_expected_form(tmp_path):
    path = write(tmp_path, {"data": {"path": "d.jsonl"}})
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(path, ["training.epochs"])


def test_missing_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("path", sorted(REPO.glob("examples/**/config*.yaml")), ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_validates(path):
    config = load_config(path)
    assert isinstance(config, RunConfig)
    assert config.data.path.is_file(), f"{path} points at missing data {config.data.path}"


def test_method_keys_for_another_kind_are_refused_not_ignored():
    with pytest.raises(ConfigError, match="from_adapter applies to kinds 'dpo' and 'grpo' only"):
        validate_config({"data": {"path": "d.jsonl"}, "method": {"kind": "lora", "from_adapter": "runs/x/adapter"}})
    with pytest.raises(ConfigError, match="adapter applies to kinds"):
        validate_config({"data": {"path": "d.jsonl"}, "method": {"kind": "lora", "adapter": False}})
    assert not validate_config({"data": {"path": "d.jsonl"},
                                "method": {"kind": "continued_pretraining", "adapter": False}}).method.uses_lora
