import pytest

from specialist.config import validate_config
from specialist.errors import ConfigError
from specialist.evaluate.gates import check_gates, parse_gate
from specialist.evaluate.stats import bootstrap_ci, paired_comparison


def test_bootstrap_interval_holds_the_mean_and_narrows_with_more_rows():
    small = bootstrap_ci([1.0, 0.0] * 10, samples=2000)
    large = bootstrap_ci([1.0, 0.0] * 200, samples=2000)
    assert small.low < 0.5 < small.high and small.mean == 0.5
    assert (large.high - large.low) < (small.high - small.low) / 3
    assert bootstrap_ci([1.0, 0.0] * 10, samples=500, seed=3) == bootstrap_ci([1.0, 0.0] * 10, samples=500, seed=3)


def test_constant_scores_give_a_zero_width_interval():
    interval = bootstrap_ci([1.0] * 30)
    assert (interval.low, interval.mean, interval.high) == (1.0, 1.0, 1.0)


def test_paired_comparison_tells_a_real_gain_from_noise():
    gain = paired_comparison([0.0] * 40, [1.0] * 30 + [0.0] * 10)
    assert gain.better == "b" and gain.p_value < 0.01 and gain.difference.mean == pytest.approx(0.75)
    noise = paired_comparison([1.0, 0.0] * 20, [0.0, 1.0] * 20)
    assert noise.better == "no difference" and noise.p_value > 0.5
    loss = paired_comparison([1.0] * 30, [0.0] * 30)
    assert loss.better == "a"


FIGURES = {"tuned.json_valid": 0.97, "base.json_valid": 0.1, "tuned.exact_match": 0.6, "base.exact_match": 0.2,
           "overfitting.memorisation_rate": 0.05}


def test_gate_forms_and_their_verdicts():
    results = check_gates(["json_valid >= 0.95", "base.exact_match <= 0.1", "tuned - base >= 0.3 on exact_match",
                           "overfitting.memorisation_rate < 0.1"], FIGURES)
    assert [r.passed for r in results] == [True, False, True, True]
    assert results[2].value == pytest.approx(0.4)


def test_a_gate_on_a_figure_not_computed_is_a_usage_error():
    with pytest.raises(ConfigError, match="did not compute") as err:
        check_gates(["forgetting.ppl_increase <= 0.1"], FIGURES)
    assert "tuned.json_valid" in str(err.value)


def test_malformed_gates_are_rejected_when_the_config_is_read():
    assert parse_gate("tuned - few_shot > 0 on exact_match").minus == "few_shot"
    with pytest.raises(ConfigError, match="cannot read gate 'json_valid ~ 3'"):
        validate_config({"data": {"path": "d.jsonl"}, "evaluation": {"gates": ["json_valid ~ 3"]}})
