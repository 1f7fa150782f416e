import json

import pytest

from specialist.errors import ModelError
from specialist.models import list_cached_models, load_model_and_tokenizer, models_dir, resolve_model


def test_local_hf_folder_resolves_to_itself(tiny_model_dir):
    assert resolve_model(str(tiny_model_dir)) == tiny_model_dir


def test_hub_id_is_passed_through():
    assert resolve_model("google/gemma-3-270m") == "google/gemma-3-270m"


def test_missing_model_is_one_clear_error(tmp_path):
    with pytest.raises(ModelError, match="not found") as err:
        resolve_model(str(tmp_path / "no-such-model"))
    assert "embedded models: gemma-3-270m" in str(err.value)


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_corrupt_gguf_is_a_model_error_and_leaves_no_cache_entry(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ModelError, match="could not read GGUF file"):
        resolve_model(str(bad))
    assert list_cached_models() == []
    assert not any(p for p in models_dir().iterdir() if not p.name.startswith("."))


def test_corrupt_weights_are_a_model_error(tiny_model_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelError, match="could not load model"):
        load_model_and_tokenizer(str(broken))


def test_cached_models_are_listed_with_size_and_shape(tiny_model_dir):
    import shutil

    entry = models_dir() / "tiny"
    shutil.copytree(tiny_model_dir, entry)
    (entry / ".specialist-complete").write_text("{}")
    shutil.copytree(tiny_model_dir, models_dir() / "half-written")  # no completion mark: never listed
    [cached] = list_cached_models()
    config = json.loads((entry / "config.json").read_text())
    attention = 32 * 32 + 32 * 16 + 32 * 16 + 32 * 32  # q, k, v (2 kv heads of 8), o
    per_layer = attention + 3 * 32 * 64 + 2 * 32  # + gate/up/down + two norms
    expected_params = config["vocab_size"] * 32 + 2 * per_layer + 32  # tied embedding stored once, final norm
    assert cached.name == "tiny"
    assert cached.parameters == expected_params
    assert cached.context_length == 512
    assert cached.disk_bytes > 0 and cached.dtype == "float32"


def test_load_sets_a_pad_token(tiny_model_dir):
    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir), dtype="float32")
    assert tokenizer.pad_token is not None and not model.training
