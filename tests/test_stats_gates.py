import re

import pytest

from specialist.config import validate_config
from specialist.core.gates import check_gates, parse_gate
from specialist.core.stats import bootstrap_ci, paired_comparison
from specialist.errors import ConfigError


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


# ---------------------------------------------------------------- intervals that stay honest at the edges
import math  # noqa: E402

import numpy as np  # noqa: E402

from specialist.core import stats  # noqa: E402
from specialist.core.gates import Figure, Figures  # noqa: E402
from specialist.core.stats import (  # noqa: E402
    Interval,
    mcnemar_exact_p,
    newcombe_paired_interval,
    score_interval,
    wilson_interval,
)


def _r4(x):
    return round(x, 4)


@pytest.mark.parametrize(("successes", "n", "low", "high"), [
    # Newcombe RG (1998) Two-sided confidence intervals for the single proportion: comparison of seven methods.
    # Statistics in Medicine 17:857-872, Table I, method 3 (Wilson score, no continuity correction).
    # Cross-checked against statsmodels 0.14 proportion_confint(method="wilson").
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0, 0.1611),
    (1, 29, 0.0061, 0.1718),
])
def test_wilson_interval_matches_newcombe_1998_table_1(successes, n, low, high):
    interval = wilson_interval(successes, n)
    assert (_r4(interval.low), _r4(interval.high)) == (low, high)
    assert interval.mean == successes / n and interval.method == "wilson" and interval.n == n


def test_proportions_get_wilson_so_all_pass_and_all_fail_keep_their_width():
    all_pass, all_fail = score_interval([1.0] * 60), score_interval([0.0] * 60)
    assert (all_pass.mean, _r4(all_pass.low), all_pass.high) == (1.0, 0.9398, 1.0)
    assert (all_fail.mean, all_fail.low, _r4(all_fail.high)) == (0.0, 0.0, 0.0602)
    assert all_pass.method == all_fail.method == "wilson"
    one = score_interval([1.0])
    assert (one.mean, _r4(one.low), one.high, one.n) == (1.0, 0.2065, 1.0, 1)
    assert score_interval([True, False, True]).method == "wilson"


def test_no_rows_gives_no_interval_and_says_so():
    empty = score_interval([])
    assert (empty.low, empty.high, empty.n, empty.method) == (None, None, 0, "none")
    assert empty.as_dict() == {"mean": 0.0, "low": None, "high": None, "method": "none", "n": 0, "confidence": 0.95}


def test_means_get_bca_constant_rows_zero_width_and_one_row_no_interval():
    values = [0.1, 0.5, 0.9, 0.3, 0.7, 0.2] * 5
    bca = score_interval(values, samples=2000)
    assert bca.method == "bca" and bca.low < bca.mean < bca.high and bca.n == 30
    assert score_interval(values, samples=2000) == bca  # fixed seed: the same interval every run
    assert score_interval(values, samples=2000, seed=7) != bca
    constant = score_interval([0.4] * 12)
    assert (constant.low, constant.mean, constant.high, constant.method) == (0.4, 0.4, 0.4, "constant")
    single = score_interval([0.4])
    assert (single.mean, single.low, single.high, single.method) == (0.4, None, None, "none")


def test_bca_falls_back_to_percentile_when_it_cannot_be_computed(monkeypatch):
    real = stats._scipy_bootstrap

    def bca_fails(data, statistic, samples, confidence, seed, method, paired=False):
        if method == "BCa":
            return math.nan, math.nan
        return real(data, statistic, samples, confidence, seed, method, paired)

    monkeypatch.setattr(stats, "_scipy_bootstrap", bca_fails)
    interval = score_interval([0.1, 0.5, 0.9, 0.3] * 5)
    assert interval.method == "percentile" and interval.low < 0.45 < interval.high


def test_wider_confidence_gives_a_wider_interval_and_bad_input_is_refused():
    narrow, wide = score_interval([1.0] * 19 + [0.0], confidence=0.8), score_interval([1.0] * 19 + [0.0], confidence=0.99)
    assert wide.low < narrow.low and wide.high >= narrow.high
    for bad in ([0.5, math.nan], [1.0, math.inf], ["x", 1.0], [[1.0, 0.0]]):
        with pytest.raises(ValueError):
            score_interval(bad)
    with pytest.raises(ValueError, match="confidence"):
        score_interval([1.0], confidence=95)
    with pytest.raises(ValueError):
        wilson_interval(5, 3)


def test_newcombe_paired_interval_and_exact_mcnemar_match_a_published_example():
    # Fagerland MW, Lydersen S, Laake P (2017) Statistical Analysis of Contingency Tables, chapter 8: complete
    # response before (b) and after (a) consolidation therapy, Cavo et al. 2012, table [[59, 6], [16, 80]].
    # Newcombe square-and-add (Newcombe 1998, Statistics in Medicine 17:2635, method 10): -0.0621
    # (95% CI -0.1186 to -0.0046); McNemar exact conditional test P = 0.052479. Same values in the book's R
    # package, contingencytables (tests/testthat/test-ch8.R).
    b = [1] * 59 + [1] * 6 + [0] * 16 + [0] * 80
    a = [1] * 59 + [0] * 6 + [1] * 16 + [0] * 80
    interval = newcombe_paired_interval(a, b)
    assert (_r4(interval.mean), _r4(interval.low), _r4(interval.high)) == (-0.0621, -0.1186, -0.0046)
    assert round(mcnemar_exact_p(a, b), 6) == 0.052479
    comparison = paired_comparison(a, b)
    assert comparison.test == "mcnemar exact" and comparison.difference == interval
    # The interval excludes 0 while the exact test does not reject at 5%: the report shows both, honestly.
    assert comparison.better == "no difference"


def test_paired_proportions_at_the_edges():
    same = paired_comparison([1.0] * 60, [1.0] * 60)
    assert same.difference.mean == 0 and same.p_value == 1.0 and same.better == "no difference"
    assert _r4(same.difference.low) == -0.0602 and _r4(same.difference.high) == 0.0602
    flip = paired_comparison([0.0] * 60, [1.0] * 60)
    assert flip.difference.mean == 1.0 and flip.difference.high == 1.0 and flip.difference.low > 0.9
    assert flip.p_value == pytest.approx(2 * 0.5**60) and flip.better == "b"
    empty = paired_comparison([], [])
    assert (empty.difference.low, empty.difference.high, empty.p_value, empty.better) == (None, None, 1.0,
                                                                                          "no difference")
    one = paired_comparison([0.0], [1.0])
    assert one.difference.mean == 1.0 and -1 <= one.difference.low < 1.0 and one.p_value == 1.0
    with pytest.raises(ValueError, match="same rows"):
        paired_comparison([1.0, 0.0], [1.0])


def test_paired_means_use_bca_on_differences_and_a_sign_flip_test():
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 1, 80)
    tuned = base + 0.1 + rng.normal(0, 0.05, 80)
    gain = paired_comparison(list(base), list(tuned))
    assert gain.test == "sign-flip permutation" and gain.difference.method == "bca"
    assert 0.08 < gain.difference.low < gain.difference.mean < gain.difference.high < 0.12
    assert gain.better == "b" and gain.p_value < 0.01
    as_dict = gain.as_dict()
    assert as_dict["difference"]["method"] == "bca" and as_dict["test"] == "sign-flip permutation"


# ---------------------------------------------------------------- gates judged on the interval
def test_a_gate_passes_on_the_value_and_fails_on_the_lower_bound():
    figures = {"tuned.json_valid": Figure.of(score_interval([1.0] * 19 + [0.0]))}  # 19 of 20: [0.764, 0.991]
    point, bound = check_gates(["json_valid >= 0.9", "json_valid >= 0.9 confidently"], figures)
    assert point.passed and not point.on_bound
    assert not bound.passed and bound.on_bound and _r4(bound.low) == 0.7639
    assert bound.describe() == ("FAIL  json_valid >= 0.9 confidently  (value 0.950, 95% interval [0.764, 0.991]: "
                                "lower bound 0.764 does not clear 0.9)")
    assert point.describe() == ("pass  json_valid >= 0.9  (value 0.950, 95% interval [0.764, 0.991]: "
                                "value clears 0.9)")


def test_describe_shows_the_value_the_interval_and_the_bound_that_cleared():
    [result] = check_gates(["json_valid >= 0.9 confidently"], {"tuned.json_valid": Figure.of(score_interval([1.0] * 60))})
    assert result.describe() == ("pass  json_valid >= 0.9 confidently  (value 1.000, 95% interval [0.940, 1.000]: "
                                 "lower bound clears 0.9)")
    assert result.as_dict()["on_bound"] is True and result.as_dict()["passed"] is True


def test_all_rows_passing_shows_json_valid_at_least_095_only_from_73_rows():
    # Wilson's lower bound at n/n is n / (n + z^2): it reaches 0.95 once n >= 0.95 * 1.96^2 / 0.05 = 72.99.
    gate = ["json_valid >= 0.95 confidently"]
    sixty, seventy_two, seventy_three = (check_gates(gate, {"json_valid": Figure.of(score_interval([1.0] * n))})[0]
                                         for n in (60, 72, 73))
    assert not sixty.passed and "lower bound 0.940 does not clear 0.95" in sixty.describe()
    assert not seventy_two.passed and seventy_three.passed
    assert check_gates(["json_valid >= 0.95"], {"json_valid": Figure.of(score_interval([1.0] * 2))})[0].passed


def test_upper_bound_gates_need_enough_rows_to_show_a_low_rate():
    few, many = Figure.of(score_interval([0.0] * 20)), Figure.of(score_interval([0.0] * 60))
    gate = ["overfitting.memorisation_rate <= 0.1 confidently"]
    assert not check_gates(gate, {"overfitting.memorisation_rate": few})[0].passed  # upper bound 0.161
    passed = check_gates(gate, {"overfitting.memorisation_rate": many})[0]
    assert passed.passed and "upper bound clears 0.1" in passed.describe()


def test_interval_mode_judges_every_gate_on_its_bound_and_the_rest_on_their_value():
    figures = {"tuned.json_valid": Figure.of(score_interval([1.0] * 19 + [0.0])), "overfitting.gap": 0.05}
    gates = ["json_valid >= 0.9", "overfitting.gap <= 0.1"]
    assert [r.passed for r in check_gates(gates, figures, "point")] == [True, True]
    interval = check_gates(gates, figures, "interval")
    assert [r.passed for r in interval] == [False, True] and [r.on_bound for r in interval] == [True, False]
    assert "no interval for this figure: judged on its value" in interval[1].describe()
    config = validate_config({"data": {"path": "d.jsonl"}, "evaluation": {"gates_confidence": "interval"}})
    assert [r.passed for r in check_gates(gates, figures, config.evaluation)] == [False, True]
    with pytest.raises(ConfigError, match="gates_confidence"):
        check_gates(gates, figures, "strict")


def test_difference_gates_read_the_paired_interval():
    base = [0.0] * 30 + [1.0] * 10
    tuned = [1.0] * 30 + [1.0] * 10
    paired = paired_comparison(base, tuned).difference  # tuned - base = 0.75, a stats.Interval
    figures = {"tuned.exact_match": 1.0, "base.exact_match": 0.25}
    differences = {("tuned", "base", "exact_match"): paired}
    excludes_zero, big, reverse = check_gates(
        ["tuned - base > 0 on exact_match confidently", "tuned - base >= 0.7 on exact_match confidently",
         "base - tuned < 0 on exact_match confidently"], Figures(figures, differences))
    assert excludes_zero.passed and excludes_zero.value == pytest.approx(0.75) and excludes_zero.low > 0.5
    assert not big.passed  # 0.75 by value, but the paired lower bound is below 0.7
    assert reverse.passed and reverse.high == pytest.approx(-excludes_zero.low)
    # Without a paired figure the point difference is still there for plain gates.
    assert check_gates(["tuned - base >= 0.7 on exact_match"], figures)[0].value == pytest.approx(0.75)


def test_confidently_on_a_figure_without_an_interval_is_a_usage_error_that_lists_those_with_one():
    figures = {"tuned.json_valid": Figure.of(score_interval([1.0] * 60)), "overfitting.gap": 0.05}
    with pytest.raises(ConfigError, match="'overfitting.gap <= 0.1 confidently'.*has no interval") as err:
        check_gates(["overfitting.gap <= 0.1 confidently"], figures)
    assert "tuned.json_valid" in str(err.value) and "overfitting.gap," not in str(err.value)
    with pytest.raises(ConfigError, match="no paired interval for tuned - base on exact_match"):
        check_gates(["tuned - base > 0 on exact_match confidently"], {"tuned.exact_match": 1.0, "base.exact_match": 0.0})


def test_a_figure_whose_interval_could_not_be_computed_fails_a_confident_gate():
    figures = {"tuned.bleu": Figure.of(score_interval([0.7]))}  # one row of a mean: no interval
    [result] = check_gates(["bleu >= 0.5 confidently"], figures)
    assert not result.passed
    assert result.describe() == ("FAIL  bleu >= 0.5 confidently  (value 0.700, 95% interval none: "
                                 "no interval from 1 row(s), so no lower bound can clear 0.5)")
    assert check_gates(["bleu >= 0.5"], figures)[0].passed


def test_confident_gate_text_is_parsed_strictly():
    assert parse_gate("json_valid >= 0.95 confidently").confidently
    gate = parse_gate("tuned - base > 0 on exact_match confidently")
    assert (gate.minus, gate.metric, gate.confidently) == ("base", "exact_match", True)
    assert not parse_gate("json_valid >= 0.95").confidently
    for bad in ("json_valid >= 0.95 confidentally", "json_valid == 1 confidently", "confidently json_valid >= 1",
                "json_valid >= 0.95 confidently confidently", ""):
        with pytest.raises(ValueError):
            parse_gate(bad)
    with pytest.raises(ValueError, match="a gate is a string"):
        parse_gate(0.95)


def test_config_accepts_confidence_settings_and_refuses_bad_ones():
    config = validate_config({"data": {"path": "d.jsonl"}, "evaluation": {
        "gates": ["json_valid >= 0.95 confidently"], "gates_confidence": "interval", "knowledge_probe_size": 0}})
    assert config.evaluation.gates_confidence == "interval" and config.evaluation.knowledge_probe_size == 0
    default = validate_config({"data": {"path": "d.jsonl"}}).evaluation
    assert (default.gates_confidence, default.knowledge_probe, default.knowledge_probe_size) == ("point", None, 300)
    with pytest.raises(ConfigError, match="gates_confidence"):
        validate_config({"data": {"path": "d.jsonl"}, "evaluation": {"gates_confidence": "bounds"}})
    with pytest.raises(ConfigError, match="knowledge_probe_size"):
        validate_config({"data": {"path": "d.jsonl"}, "evaluation": {"knowledge_probe_size": -1}})
    with pytest.raises(ConfigError, match="'confidently' needs >=, >, <= or <"):
        validate_config({"data": {"path": "d.jsonl"}, "evaluation": {"gates": ["json_valid == 1 confidently"]}})


def test_figures_are_built_from_bounds_intervals_or_their_json():
    interval = score_interval([1.0] * 19 + [0.0])
    by_bounds, by_interval, by_json = (Figure(interval.mean, interval.low, interval.high), Figure.of(interval),
                                       Figure.of(interval.as_dict()))
    assert by_bounds.has_interval and by_interval == by_json
    assert (by_bounds.value, by_bounds.low, by_bounds.high) == (by_interval.value, by_interval.low, by_interval.high)
    assert not Figure(0.5).has_interval and Figure.of(score_interval([0.5])).missing == "no interval from 1 row(s)"
    gates = ["json_valid >= 0.9 confidently"]
    assert [r.passed for f in (by_bounds, by_interval, by_json)
            for r in check_gates(gates, Figures({"tuned.json_valid": f}))] == [False] * 3


# -- gates on arms an evaluation leaves out: refused before any answer is generated ------------------------------

@pytest.mark.parametrize("overrides, gate, missing", [
    (["evaluation.skip_base=true"], "tuned - base >= 0.2 on exact_match", "base"),
    (["evaluation.skip_base=true"], "tuned - retrieval > 0 on exact_match", "retrieval"),
    (["evaluation.few_shot_k=0"], "few_shot.exact_match >= 0.1", "few_shot"),
    (["evaluation.baselines=[]"], "tuned - nearest > 0 on exact_match", "nearest"),
    ([], "tuned+constrained.json_valid >= 0.9", "tuned+constrained"),
])
def test_run_refuses_a_gate_on_an_arm_left_out_before_training(tiny_config, monkeypatch, overrides, gate, missing):
    """A gate on an arm the config leaves out stopped `specialist run` only after the whole training (an hour of
    log-root-cause); it is now refused before a step is trained, and by `validate`."""
    import copy

    import specialist.pipeline as pipeline
    from specialist.config import apply_override

    def apply_overrides(raw: dict, overrides: list[str]) -> dict:
        raw = copy.deepcopy(raw)
        for override in overrides:
            apply_override(raw, override)
        return raw

    def never(*args, **kwargs):
        raise AssertionError("training started before the gates were checked against the arms")

    monkeypatch.setattr(pipeline, "train_only", never)
    raw = apply_overrides(tiny_config, [*overrides, f"evaluation.gates=['{gate}']"])
    with pytest.raises(ConfigError, match=f"reads {re.escape(missing)}, which this evaluation does not score"):
        pipeline.run(validate_config(raw))
    kept = apply_overrides(tiny_config, [f"evaluation.gates=['{gate}']", "evaluation.constrained=true"])
    with pytest.raises(AssertionError, match="training started"):  # the same gate with its arm kept passes the check
        pipeline.run(validate_config(kept))


def test_a_gate_on_an_arm_left_out_is_refused_before_generation(tiny_run_dir, monkeypatch):
    import specialist.evaluate.runner as runner
    from specialist.core.gates import refuse_gates_on_arms_left_out
    from specialist.run_folder import RunFolder

    def never(*args, **kwargs):
        raise AssertionError("an answer was generated before the gates were checked")

    monkeypatch.setattr(runner, "answer", never)
    config = RunFolder(tiny_run_dir).config(["evaluation.skip_base=true",
                                             "evaluation.gates=['tuned - base >= 0.2 on exact_match']"])
    with pytest.raises(ConfigError, match="reads base, which this evaluation does not score") as caught:
        runner.evaluate_run(tiny_run_dir, config)
    assert "skip_base" in caught.value.hint and "evaluation.gates=[]" in caught.value.hint

    scored, others = ["tuned", "sft"], ["sft"]
    for fine in ("json_valid >= 0.9", "sft.exact_match <= 1", "tuned - sft >= 0 on exact_match",
                 "overfitting.train_test_gap <= 0.1", "forgetting.ppl_increase <= 1"):
        refuse_gates_on_arms_left_out([fine], scored, others)
    for refused, names in (("few_shot.exact_match >= 0.1", "few_shot"),
                           ("tuned+constrained - base >= 0 on json_valid", "base, tuned+constrained"),
                           ("rft - sft >= 0 on exact_match", None)):
        if names is None:  # an unknown arm is not this check's to judge: the gate lookup says what exists
            refuse_gates_on_arms_left_out([refused], scored, others)
            continue
        with pytest.raises(ConfigError, match=f"reads {re.escape(names)},"):
            refuse_gates_on_arms_left_out([refused], scored, others)


def test_gates_can_name_the_constrained_arm():
    figures = {"tuned+constrained.json_valid": 1.0, "tuned.json_valid": 0.9}
    results = check_gates(["tuned+constrained.json_valid >= 0.95", "tuned+constrained - tuned >= 0.05 on json_valid"],
                          figures)
    assert [r.passed for r in results] == [True, True] and results[1].value == pytest.approx(0.1)


def test_an_interval_prints_as_value_and_bounds_in_every_table():
    interval = Interval(0.8, 0.4902, 0.9433, "wilson", 10)
    assert interval.format() == "0.800 [0.490, 0.943]"
    assert interval.format(".1f", 100, "%") == "80.0% [49.0, 94.3]"
    assert interval.negated().format("+.1f", 100, " pts") == "-80.0 pts [-94.3, -49.0]"
    assert Interval(0.05, 0.01, None).format("+.1f", 100, "%", "%") == "+5.0%"  # half an interval is none
    assert Interval(1.0, None, None).format_bounds() == "none"
    read = Interval.from_dict({"mean": 0.1, "low": 0.0, "high": 0.2, "n": "?", "confidence": None}, mean=0.5)
    assert (read.mean, read.format_bounds(), read.n, read.confidence) == (0.5, "[0.000, 0.200]", 0, 0.95)
