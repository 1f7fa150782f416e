"""tuned+constrained against the best baseline: paired comparisons, eval.json, report.md/html, the CLI line and the
gate, on synthetic per-row scores (no model: every figure here can be computed by hand)."""

import json

import pytest

from specialist.config import validate_config
from specialist.core.gates import BEST_BASELINE, check_gates, refuse_gates_on_arms_left_out
from specialist.core.stats import paired_comparison, score_interval
from specialist.errors import ConfigError
from specialist.evaluate.baseline_arms import best_baselines, versus_best_lines
from specialist.evaluate.results import ArmPair, ArmResult, EvalReport
from specialist.evaluate.runner import compare_arms, figures_of

SAMPLES = 200
N = 60
GATE = "tuned+constrained - best_baseline > 0 on field_accuracy confidently"


def _fraction_rows(right: int, partly: int) -> list[float]:
    """Field accuracy per row: `right` rows fully right, `partly` half right, the rest wrong."""
    return [1.0] * right + [0.5] * partly + [0.0] * (N - right - partly)


def _binary_rows(right: int) -> list[float]:
    return [1.0] * right + [0.0] * (N - right)


def synthetic_rows(constrained: dict[str, list[float]] | None = None) -> dict[str, dict[str, list[float]]]:
    """base far behind, nearest the best baseline, tuned a little ahead of it, tuned+constrained clearly ahead (the
    log-root-cause shape); each arm scored by exact_match (0/1), field_accuracy (fractions) and length."""
    rows = {
        "base": {"exact_match": _binary_rows(5), "field_accuracy": _fraction_rows(5, 10), "length": [3.0] * N},
        "nearest": {"exact_match": _binary_rows(30), "field_accuracy": _fraction_rows(30, 10), "length": [4.0] * N},
        "tuned": {"exact_match": _binary_rows(33), "field_accuracy": _fraction_rows(32, 10), "length": [4.0] * N},
        "tuned+constrained": {"exact_match": _binary_rows(40), "field_accuracy": _fraction_rows(45, 10),
                              "length": [4.0] * N},
    }
    if constrained is not None:
        rows["tuned+constrained"] = constrained
    return rows


def report_of(rows: dict[str, dict[str, list[float]]], tmp_path) -> EvalReport:
    """What scored_report builds from per-row scores, without the arms' answers."""
    arms = {name: ArmResult(name, {metric: score_interval(values, SAMPLES) for metric, values in scores.items()}, {})
            for name, scores in rows.items()}
    report = EvalReport(run_dir=tmp_path, n_eval=N, max_new_tokens=8, decoding={"do_sample": False}, arms=arms,
                        comparisons=compare_arms(rows, SAMPLES))
    report.best_baseline = best_baselines(report.arms)
    return report


def test_every_tuned_arm_is_compared_with_every_other_arm_and_constrained_with_tuned():
    rows = synthetic_rows() | {"sft": synthetic_rows()["tuned"]}  # another run given with --arm
    comparisons = compare_arms(rows, SAMPLES)
    assert [pair.key for pair in comparisons] == [
        "tuned_vs_base", "tuned_vs_nearest", "tuned_vs_sft",
        "tuned+constrained_vs_base", "tuned+constrained_vs_nearest", "tuned+constrained_vs_sft",
        "tuned+constrained_vs_tuned"]
    assert ArmPair("tuned", "tuned+constrained") not in comparisons  # one direction only: gates negate the other
    assert all(set(per_metric) == {"exact_match", "field_accuracy"} for per_metric in comparisons.values())
    by_hand = paired_comparison(rows["tuned"]["field_accuracy"], rows["tuned+constrained"]["field_accuracy"], SAMPLES)
    assert comparisons[ArmPair("tuned+constrained", "tuned")]["field_accuracy"] == by_hand


def test_without_a_tuned_arm_nothing_is_compared():
    rows = synthetic_rows()
    assert compare_arms({name: rows[name] for name in ("base", "nearest")}, SAMPLES) == {}


def test_the_constrained_arm_against_the_best_baseline_is_the_paired_comparison_by_hand(tmp_path):
    rows = synthetic_rows()
    report = report_of(rows, tmp_path)
    assert report.best_baseline == {"exact_match": "nearest", "field_accuracy": "nearest"}
    entries = report.versus_best_baseline()
    assert [(e.metric, e.tuned, e.baseline) for e in entries] == [
        ("exact_match", "tuned", "nearest"), ("exact_match", "tuned+constrained", "nearest"),
        ("field_accuracy", "tuned", "nearest"), ("field_accuracy", "tuned+constrained", "nearest")]
    by_hand = paired_comparison(rows["nearest"]["field_accuracy"], rows["tuned+constrained"]["field_accuracy"], SAMPLES)
    constrained = entries[3]
    assert constrained.comparison == by_hand and by_hand.better == "b" and by_hand.difference.low > 0
    assert constrained.tuned_value == pytest.approx(50 / N) and constrained.baseline_value == pytest.approx(35 / N)
    # the figure a gate reads is that same interval
    assert figures_of(report).differences[("tuned+constrained", BEST_BASELINE, "field_accuracy")] == by_hand.difference


def test_eval_json_keeps_tuned_keys_and_adds_the_constrained_arm(tmp_path):
    rows = synthetic_rows()
    report = report_of(rows, tmp_path)
    data = json.loads(json.dumps(report.to_json()))  # plain JSON all the way down
    best = data["best_baseline"]["field_accuracy"]
    # what readers had: arm, baseline, tuned, comparison (tuned's)
    assert best["arm"] == "nearest" and best["baseline"] == pytest.approx(35 / N)
    assert best["tuned"] == pytest.approx(37 / N)
    assert best["comparison"] == data["comparisons"]["tuned_vs_nearest"]["field_accuracy"]
    # what is new: the constrained arm's value and its comparison, under its own name
    assert best["tuned+constrained"] == pytest.approx(50 / N)
    by_hand = paired_comparison(rows["nearest"]["field_accuracy"], rows["tuned+constrained"]["field_accuracy"], SAMPLES)
    assert best["tuned+constrained_comparison"] == json.loads(json.dumps(by_hand.as_dict()))
    assert best["tuned+constrained_comparison"] == data["comparisons"]["tuned+constrained_vs_nearest"]["field_accuracy"]
    assert "tuned+constrained_vs_tuned" in data["comparisons"]


def _barely_ahead_of_nearest() -> list[float]:
    """Nearest's rows shifted by 7 (right on other rows, so the differences take both signs) and one wrong row made
    right: ahead by 1/60 on the mean, with a paired interval that straddles zero."""
    nearest = _fraction_rows(30, 10)
    shifted = nearest[7:] + nearest[:7]
    shifted[shifted.index(0.0)] = 1.0
    return shifted


@pytest.mark.parametrize(("constrained", "passes"),
                         [(_fraction_rows(45, 10), True), (_barely_ahead_of_nearest(), False)])
def test_the_constrained_best_baseline_gate_passes_only_when_the_interval_clears_zero(tmp_path, constrained, passes):
    rows = synthetic_rows()
    rows["tuned+constrained"]["field_accuracy"] = constrained
    report = report_of(rows, tmp_path)
    [result] = check_gates([GATE], figures_of(report))
    assert result.passed is passes and result.on_bound and result.value > 0  # ahead on the mean either way
    by_hand = paired_comparison(rows["nearest"]["field_accuracy"], rows["tuned+constrained"]["field_accuracy"], SAMPLES)
    assert (result.value, result.low, result.high) == (by_hand.difference.mean, by_hand.difference.low,
                                                       by_hand.difference.high)


def test_the_constrained_gate_is_refused_before_scoring_when_the_arm_is_off():
    scored = ["base", "nearest", "tuned"]
    with pytest.raises(ConfigError, match=r"tuned\+constrained"):
        refuse_gates_on_arms_left_out([GATE], scored, [])
    refuse_gates_on_arms_left_out([GATE], [*scored, "tuned+constrained"], [])
    with pytest.raises(ConfigError, match="best_baseline"):  # no baseline scored at all
        refuse_gates_on_arms_left_out([GATE], ["tuned", "tuned+constrained"], [])


def test_without_the_constrained_arm_only_tuned_lines_and_keys_appear(tmp_path):
    rows = synthetic_rows()
    del rows["tuned+constrained"]
    report = report_of(rows, tmp_path)
    assert {pair.arm for pair in report.comparisons} == {"tuned"}
    assert {e.tuned for e in report.versus_best_baseline()} == {"tuned"}
    assert all("tuned+constrained" not in line for line in versus_best_lines(report))
    best = report.to_json()["best_baseline"]
    assert all(set(per_metric) == {"arm", "baseline", "tuned", "comparison"} for per_metric in best.values())
    # the gate had been let through (no check before scoring here): it fails loudly rather than passing
    with pytest.raises(ConfigError, match="no paired interval"):
        check_gates([GATE], figures_of(report))


def test_a_metric_the_constrained_arm_lacks_gets_no_line_and_no_key(tmp_path):
    rows = synthetic_rows(constrained={"exact_match": _binary_rows(40), "length": [4.0] * N})
    report = report_of(rows, tmp_path)
    assert set(report.comparisons[ArmPair("tuned+constrained", "nearest")]) == {"exact_match"}
    assert [(e.metric, e.tuned) for e in report.versus_best_baseline()] == [
        ("exact_match", "tuned"), ("exact_match", "tuned+constrained"), ("field_accuracy", "tuned")]
    best = report.to_json()["best_baseline"]
    assert "tuned+constrained" in best["exact_match"] and "tuned+constrained" not in best["field_accuracy"]
    assert "tuned+constrained_comparison" not in best["field_accuracy"]
    with pytest.raises(ConfigError):  # a gate on it names a figure this evaluation did not compute
        check_gates([GATE], figures_of(report))


def test_ties_the_constrained_arm_equal_to_the_best_baseline_and_baselines_equal_to_each_other(tmp_path):
    rows = synthetic_rows()
    rows["base"] = dict(rows["nearest"])  # tie between baselines: base is listed first in BASELINE_ARM_NAMES
    rows["tuned+constrained"] = dict(rows["nearest"])  # tie with the best baseline, row for row
    report = report_of(rows, tmp_path)
    assert report.best_baseline == {"exact_match": "base", "field_accuracy": "base"}
    constrained = [e for e in report.versus_best_baseline() if e.tuned == "tuned+constrained"]
    assert all(e.baseline == "base" and e.comparison.difference.mean == 0 for e in constrained)
    assert all(e.comparison.better == "no difference" for e in constrained)
    lines = [line for line in versus_best_lines(report) if " tuned+constrained " in line]
    assert lines and all("+0.0 pts" in line and "(no difference)" in line for line in lines)
    point, confident = check_gates(["tuned+constrained - best_baseline >= 0 on field_accuracy", GATE],
                                   figures_of(report))
    assert point.passed and not confident.passed  # equal is not "confidently ahead"


def test_report_md_html_and_the_cli_carry_the_constrained_line(tmp_path, capsys):
    from specialist.cli import print_versus_best
    from specialist.data import Example
    from specialist.evaluate.report import write_eval_report
    from specialist.run_folder import RunFolder

    report = report_of(synthetic_rows(), tmp_path)
    lines = versus_best_lines(report)
    constrained = [line for line in lines if line.startswith("field_accuracy: tuned+constrained ")]
    assert constrained == [line for line in lines if "tuned+constrained 83.3% vs nearest 58.3%: +25.0 pts" in line]
    assert constrained[0].endswith("(tuned+constrained ahead)")
    tuned = next(line for line in lines if line.startswith("field_accuracy: tuned "))
    assert lines.index(constrained[0]) == lines.index(tuned) + 1  # beside tuned's line on the same metric

    config = validate_config({"data": {"path": "x.jsonl"}, "output": {"run_name": "vsbest"}})
    outputs = {name: ['{"a": 1}'] * N for name in report.arms}
    run = RunFolder(tmp_path)
    write_eval_report(run, config, report, [Example(f"q{i}", '{"a": 1}', i + 1) for i in range(N)], outputs)
    markdown = run.report_md.read_text()
    assert "## Tuned against the best baseline" in markdown
    assert "- exact_match: tuned " in markdown  # tuned's line as before
    assert f"- {constrained[0]}" in markdown
    html = run.report_html.read_text()
    assert "<td>tuned+constrained</td>" in html and "+25.0 pts" in html

    print_versus_best(report)
    printed = capsys.readouterr().err
    assert "tuned against the best baseline" in printed and constrained[0] in printed
