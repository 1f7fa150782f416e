import json

import pytest

from specialist.data import Columns, Example, load_examples, split_examples, write_split
from specialist.errors import DataError


def test_jsonl_rows_keep_their_line_numbers(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "c", "completion": {"k": 1}}\n')
    examples = load_examples(path)
    assert examples == [Example("a", "b", 1), Example("c", '{"k": 1}', 3)]


def test_csv_with_custom_columns(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('log,json\n"x, y","{""a"": 1}"\n')
    assert load_examples(path, Columns("log", "json")) == [Example("x, y", '{"a": 1}', 2)]


def test_preference_and_plain_text_shapes(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "q", "chosen": "good", "rejected": "bad", "text": "plain"}\n')
    assert load_examples(path, Columns("prompt", "chosen", "rejected")) == [Example("q", "good", 1, rejected="bad")]
    assert load_examples(path, Columns("", "text")) == [Example("", "plain", 1)]


def test_malformed_json_names_file_line_and_fix(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", \n')
    with pytest.raises(DataError) as err:
        load_examples(path)
    assert f"{path}:2: malformed JSON" in str(err.value)
    assert "hint:" in str(err.value)


def test_missing_column_lists_the_columns_present(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"input": "a", "output": "b"}\n')
    with pytest.raises(DataError) as err:
        load_examples(path)
    assert "missing column(s) ['prompt', 'completion']" in str(err.value)
    assert "['input', 'output']" in str(err.value)
    assert "data.prompt_column" in str(err.value)


def test_empty_completion_and_non_utf8_are_reported(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": " "}\n{"prompt": "\xff", "completion": "b"}\n')
    with pytest.raises(DataError) as err:
        load_examples(path)
    assert ":1: empty ['completion']" in str(err.value)
    assert ":2: not UTF-8" in str(err.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        load_examples(tmp_path / "none.jsonl")


def examples(n):
    return [Example(f"p{i}", f"c{i}", i + 1) for i in range(n)]


def test_split_is_deterministic_for_a_seed_and_partitions_the_data():
    first = split_examples(examples(100), 0.1, 0.2, seed=7)
    again = split_examples(examples(100), 0.1, 0.2, seed=7)
    other = split_examples(examples(100), 0.1, 0.2, seed=8)
    assert first == again
    assert first.test != other.test
    assert (len(first.train), len(first.val), len(first.test)) == (70, 10, 20)
    seen = [ex.prompt for part in first.parts().values() for ex in part]
    assert sorted(seen) == sorted(f"p{i}" for i in range(100))


def test_split_refuses_too_few_rows():
    with pytest.raises(DataError, match="too few"):
        split_examples(examples(2), 0.4, 0.4, seed=0)


def test_written_split_files_carry_their_hashes(tmp_path):
    split = split_examples(examples(20), 0.1, 0.1, seed=0)
    summary = write_split(split, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "test.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [ex.prompt for ex in split.test]
    assert summary["train"]["rows"] == len(split.train)
    import hashlib

    assert summary["val"]["sha256"] == hashlib.sha256((tmp_path / "val.jsonl").read_bytes()).hexdigest()
