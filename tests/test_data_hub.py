"""data.path naming a Hugging Face hub dataset (org/name), read through `datasets.load_dataset` and its cache.

There is no network here, nor in CI: the hub is switched off (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE) and a dataset
is put in the datasets cache exactly where an earlier online `load_dataset` leaves it, so the real code path
(`load_dataset` finding the cached copy offline) runs; a name not in the cache gives the error naming the cache."""

import json
import shutil

import pytest
import yaml

from specialist.config import DataConfig, load_config, validate_config
from specialist.data import prepare
from specialist.data.readers import is_hub_dataset
from specialist.errors import ConfigError, DataError


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty datasets cache, with the hub unreachable (datasets reads these settings at import)."""
    import datasets
    import huggingface_hub.constants

    cache = tmp_path / "hf-datasets-cache"
    cache.mkdir()
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def cache_hub_dataset(cache, repo_id, splits, subset="default"):
    """Write `splits` ({name: rows}) into `cache` where load_dataset(repo_id, subset) leaves a downloaded dataset."""
    from datasets.packaged_modules.json.json import Json

    build = cache.parent / "build"
    files = {}
    for split, rows in splits.items():
        path = cache.parent / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        files[split] = str(path)
    name = repo_id.split("/")[-1]
    builder = Json(cache_dir=str(build), dataset_name=name, config_name=subset, hash="0" * 16, data_files=files)
    builder.download_and_prepare()
    target = cache / repo_id.replace("/", "___") / subset / "0.0.0" / ("0" * 16)
    target.parent.mkdir(parents=True)
    shutil.move(builder.cache_dir, target)


def pairs(n, prefix="question"):
    return [{"prompt": f"{prefix} {i} alpha{i} beta{i} gamma{i}", "completion": f"answer{i} delta{i}"} for i in range(n)]


def run_prepare(tmp_path, path, **options):
    data = DataConfig.model_validate({"path": str(path), **options})
    return prepare(data, "lora", tmp_path / "out", 0, show_progress=False)


def test_a_cached_hub_dataset_is_read_through_load_dataset(tmp_path, offline_cache):
    cache_hub_dataset(offline_cache, "acme/tickets", {"train": pairs(30), "test": pairs(5, prefix="held")})
    prepared = run_prepare(tmp_path, "acme/tickets")
    assert prepared.report["source"]["format"] == "hub" and prepared.report["rows_read"] == 30
    assert sum(prepared.report["splits"].values()) == 30
    other = run_prepare(tmp_path / "t", "acme/tickets", split="test")
    assert other.report["rows_read"] == 5 and all(e.prompt.startswith("held") for e in other.split.train)


def test_a_hub_subset_is_chosen_by_data_subset(tmp_path, offline_cache):
    cache_hub_dataset(offline_cache, "acme/multi", {"train": pairs(20, prefix="short")}, subset="short")
    prepared = run_prepare(tmp_path, "acme/multi", subset="short")
    assert prepared.report["rows_read"] == 20
    with pytest.raises(DataError) as error:
        run_prepare(tmp_path / "x", "acme/multi", subset="long")
    assert "acme/multi" in str(error.value) and "data.subset long" in str(error.value)


def test_an_uncached_hub_dataset_offline_names_the_cache_and_the_fix(tmp_path, offline_cache):
    with pytest.raises(DataError) as error:
        run_prepare(tmp_path, "acme/never-downloaded")
    message = str(error.value)
    assert "acme/never-downloaded" in message and str(offline_cache) in message
    assert "hf download acme/never-downloaded --repo-type dataset" in message
    assert not (tmp_path / "out").exists()


def test_an_unknown_hub_split_is_a_clear_error(tmp_path, offline_cache):
    cache_hub_dataset(offline_cache, "acme/tickets", {"train": pairs(30)})
    with pytest.raises(DataError) as error:
        run_prepare(tmp_path, "acme/tickets", split="validation")
    assert "data.split validation" in str(error.value) and "validation" in str(error.value).split("loaded:")[1]


def test_a_local_path_that_exists_wins_over_a_hub_name(tmp_path, offline_cache):
    from datasets import Dataset

    cache_hub_dataset(offline_cache, "acme/tickets", {"train": pairs(30, prefix="hub")})
    Dataset.from_list(pairs(25, prefix="local")).save_to_disk(str(tmp_path / "acme" / "tickets"))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"data": {"path": "acme/tickets"}}))
    loaded = load_config(config)
    assert loaded.data.path == tmp_path / "acme" / "tickets"
    prepared = run_prepare(tmp_path, loaded.data.path)
    assert prepared.report["rows_read"] == 25 and prepared.report["source"]["format"] == "arrow"


def test_a_hub_name_in_a_config_is_kept_as_written(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"data": {"path": "acme/tickets", "split": "train[:100]", "subset": "en"}}))
    data = load_config(config).data
    assert str(data.path) == "acme/tickets" and (data.split, data.subset) == ("train[:100]", "en")
    assert is_hub_dataset("acme/tickets") and not is_hub_dataset("../tickets/x") and not is_hub_dataset("a/b/c")
    assert not is_hub_dataset(tmp_path / "acme" / "tickets") and not is_hub_dataset("tickets.jsonl")


def test_split_and_subset_are_refused_for_a_local_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in pairs(20)))
    with pytest.raises(DataError) as error:
        run_prepare(tmp_path, path, split="train")
    assert "data.split and data.subset" in str(error.value) and str(path) in str(error.value)


@pytest.mark.parametrize("key", ["split", "subset"])
def test_empty_split_or_subset_is_refused_naming_the_key(key):
    with pytest.raises(ConfigError) as error:
        validate_config({"data": {"path": "acme/tickets", key: ""}})
    assert f"data.{key}" in str(error.value)
