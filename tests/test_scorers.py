import pytest

from specialist.core.scorers import (
    format_check,
    per_key_accuracy,
    resolve_scorers,
    score_exact_match,
    score_field_accuracy,
    score_json_valid,
    score_rows,
)

EXPECTED = '{"level": "INFO", "component": "dfs.DataNode", "template": "Receiving <*>"}'


@pytest.mark.parametrize(
    ("output", "valid"),
    [('{"a": 1}', 1.0), ("[1, 2]", 1.0), ('{"a": 1', 0.0), ("Sure! Here is the JSON: {}", 0.0), ("", 0.0)],
)
def test_json_valid(output, valid):
    assert score_json_valid(output, EXPECTED) == valid


def test_the_format_check_is_the_schema_before_plain_json_and_none_for_free_text(tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text('{"type": "object", "required": ["level"]}', encoding="utf-8")
    both = format_check(["exact_match", "json_valid", "json_schema"], schema)
    assert both('{"level": "INFO"}') and not both('{"other": 1}') and not both("{")  # the schema decides
    plain = format_check(["json_valid", "exact_match"])
    assert plain('{"other": 1}') and plain("[1]") and not plain("Sure: {}")
    assert format_check(["exact_match", "rouge_l"]) is None


def test_exact_match_ignores_key_order_and_spacing_for_json():
    reordered = '{"template":"Receiving <*>","component":"dfs.DataNode","level":"INFO"}'
    assert score_exact_match(reordered, EXPECTED) == 1.0
    assert score_exact_match(reordered.replace("INFO", "WARN"), EXPECTED) == 0.0


def test_exact_match_on_plain_text_strips_whitespace():
    assert score_exact_match(" security \n", "security") == 1.0
    assert score_exact_match("Security", "security") == 0.0


def test_field_accuracy_counts_each_key():
    two_of_three = '{"level": "INFO", "component": "dfs.DataNode", "template": "wrong"}'
    assert score_field_accuracy(two_of_three, EXPECTED) == pytest.approx(2 / 3)
    assert score_field_accuracy("not json", EXPECTED) == 0.0
    assert score_field_accuracy('{"level": null}', '{"level": null, "component": "sshd"}') == 0.5


def test_score_rows_scores_every_row_and_per_key_accuracy_reports_keys():
    outputs = [EXPECTED, '{"level": "INFO"}', "garbage"]
    rows = score_rows(outputs, [EXPECTED] * 3, resolve_scorers(["json_valid", "exact_match", "field_accuracy"]))
    assert rows["json_valid"] == [1.0, 1.0, 0.0]
    assert rows["exact_match"] == [1.0, 0.0, 0.0]
    assert rows["field_accuracy"] == pytest.approx([1.0, 1 / 3, 0.0])
    assert per_key_accuracy(outputs, [EXPECTED] * 3) == {"level": pytest.approx(2 / 3),
                                                        "component": pytest.approx(1 / 3),
                                                        "template": pytest.approx(1 / 3)}
