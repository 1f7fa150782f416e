"""The evaluation scorers beyond JSON, each on hand-made cases."""

import json
import random

import pytest

from specialist.core.scorers import (
    BUILTIN,
    LabelRule,
    label_report,
    length_report,
    make_json_schema,
    make_label_accuracy,
    refusal_report,
    resolve_scorers,
    score_chrf,
    score_length,
    score_refusal_rate,
    score_rouge_l,
)
from specialist.errors import ConfigError


def test_rouge_l_is_lcs_f1_on_words():
    assert score_rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    # LCS "the cat the mat" = 4 of 6 words each side
    assert score_rouge_l("the cat sat on the mat", "the cat was under the mat") == pytest.approx(4 / 6)
    assert score_rouge_l("alpha", "beta") == 0.0


def test_chrf_rewards_partial_character_overlap():
    assert score_chrf("connection refused", "connection refused") == pytest.approx(1.0)
    near, far = score_chrf("connection refuse", "connection refused"), score_chrf("disk full", "connection refused")
    assert 0.8 < near < 1.0 and far < 0.2


def _random_texts(rng: random.Random, count: int) -> list[str]:
    """Texts drawn from a small vocabulary (so pairs overlap) with case, punctuation, digits, non-ASCII words and
    odd whitespace: where a hand-written tokenizer and the reference ones disagree."""
    words = ["the", "Cat", "sat", "on", "mat", "disk", "full", "error:", "(null)", "404", "naïve", "café", "日本語",
             "über", "x=1;", "—", "it's", "C++", "a.b.c", "!!", "ok", "timeout", "Timeout", "ёж"]
    spaces = [" ", " ", " ", "  ", "\t", "\n", ""]
    texts = []
    for _ in range(count):
        picked = [rng.choice(words) for _ in range(rng.randint(0, 12))]
        texts.append("".join(word + rng.choice(spaces) for word in picked).strip(rng.choice(["", " "])))
    return texts


def test_rouge_l_and_chrf_equal_their_reference_packages_on_random_text():
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import CHRF

    rng = random.Random(27)
    outputs, expected = _random_texts(rng, 300), _random_texts(rng, 300)
    expected[:20] = outputs[:20]  # identical pairs too
    rouge, chrf = rouge_scorer.RougeScorer(["rougeL"]), CHRF()
    for output, want in zip(outputs, expected):
        assert score_rouge_l(output, want) == pytest.approx(rouge.score(want, output)["rougeL"].fmeasure, abs=1e-12)
        assert score_chrf(output, want) == pytest.approx(chrf.sentence_score(output, [want]).score / 100, abs=1e-12)


def test_chrf_counts_punctuation_and_non_ascii_while_rouge_l_ignores_them():
    # sacrebleu's chrF drops all whitespace (newlines and tabs too, which the hand-written one kept as characters)
    # and only whitespace: punctuation and accented letters are characters that must match
    assert score_chrf("{\n  \"a\": 1\n}", '{"a": 1}') == 1.0
    assert score_chrf("hello, world!", "hello world") < 0.7
    assert score_chrf("cafe", "café") < 1.0
    # rouge-score keeps [a-z0-9] runs only: punctuation is no token, and "café" reads as the token "caf"
    assert score_rouge_l("hello, world!", "hello world") == 1.0
    assert score_rouge_l("cafe", "café") == 0.0
    assert score_rouge_l("日本語", "日本語") == 0.0  # no ASCII token at all: the reference scores 0


def test_label_accuracy_reads_labels_by_json_key_or_pattern():
    by_key = make_label_accuracy(LabelRule(json_key="priority"))
    assert by_key('{"priority": "Major"}', '{"priority": "major"}') == 1.0
    assert by_key("Major", '{"priority": "Major"}') == 0.0
    by_pattern = make_label_accuracy(LabelRule(pattern=r"category:\s*(\w+)"))
    assert by_pattern("I think category: security, clearly", "category: Security") == 1.0
    assert make_label_accuracy(LabelRule())(" UI \n", "ui") == 1.0


def test_label_report_gives_macro_f1_and_the_confusion_matrix():
    expected = ["a", "a", "a", "b", "b", "c"]
    outputs = ["a", "a", "b", "b", "b", "x"]
    report = label_report(outputs, expected, LabelRule())
    assert report["accuracy"] == pytest.approx(4 / 6)
    assert report["labels"] == ["a", "b", "c"] and report["predicted_labels"] == ["a", "b", "c", "x"]
    assert report["confusion"] == [[2, 1, 0, 0], [0, 2, 0, 0], [0, 0, 0, 1]]
    f1_a, f1_b, f1_c = 2 * 1 * (2 / 3) / (1 + 2 / 3), 2 * (2 / 3) * 1 / (2 / 3 + 1), 0.0
    assert report["macro_f1"] == pytest.approx((f1_a + f1_b + f1_c) / 3)
    assert report["per_label"]["c"]["support"] == 1


def test_refusals_are_reported_in_both_directions():
    expected = ["I can't help with that.", "I cannot assist with weapons.", "Use kill -9 PID.", "Run ps aux."]
    outputs = ["I can't help with that.", "Sure, here is how.", "I won't do that.", "Run ps aux."]
    report = refusal_report(outputs, expected)
    assert report == {"should_refuse": 2, "should_answer": 2, "refused_when_should": 0.5,
                      "refused_when_should_not": 0.5}
    assert score_refusal_rate("I'm unable to do this", "") == 1.0
    assert score_refusal_rate("how to kill a Python process: os.kill", "") == 0.0
    # refusal_match: the right call in each direction, as a 0-1 score a reward or gate can use
    assert [BUILTIN["refusal_match"](o, e) for o, e in zip(outputs, expected)] == [1.0, 0.0, 0.0, 1.0]


def test_json_schema_checks_structure(tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "required": ["severity"],
                                  "properties": {"severity": {"enum": ["low", "high"]}}}))
    score = make_json_schema(schema)
    assert score('{"severity": "low"}', "") == 1.0
    assert score('{"severity": "medium"}', "") == 0.0
    assert score("not json", "") == 0.0
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="not a usable JSON schema"):
        make_json_schema(tmp_path / "bad.json")


def test_length_statistics():
    assert score_length("one two three", "") == 3.0
    assert length_report(["a", "a b", "a b c", "a b c d"]) == {"mean": 2.5, "p50": 3, "p95": 4, "max": 4}


def test_custom_scorer_is_imported_by_path_and_bad_paths_are_config_errors():
    scorers = resolve_scorers(["json_valid", "specialist.core.scorers:score_rouge_l"])
    assert scorers["specialist.core.scorers:score_rouge_l"]("a b", "a b") == 1.0
    with pytest.raises(ConfigError, match="cannot be imported"):
        resolve_scorers(["no_such_module:f"])
    with pytest.raises(ConfigError, match="unknown scorer"):
        resolve_scorers(["bleu"])
    with pytest.raises(ConfigError, match="needs evaluation.json_schema"):
        resolve_scorers(["json_schema"])


def test_escalation_is_reported_apart_so_a_router_that_never_escalates_looks_bad():
    from specialist.core.scorers import LabelRule, label_report

    expected = ['{"route": "card"}', '{"route": "card"}', '{"route": "refund"}', '{"route": "escalate"}',
                '{"route": "escalate"}']
    never = ['{"route": "card"}', '{"route": "card"}', '{"route": "refund"}', '{"route": "card"}',
             '{"route": "refund"}']
    report = label_report(never, expected, LabelRule(json_key="route"), escalation="escalate")
    assert report["accuracy"] == 0.6 and report["escalation"]["recall"] == 0.0
    assert report["escalation"]["in_scope_accuracy"] == 1.0 and report["escalation"]["false_escalation_rate"] == 0.0
    eager = ['{"route": "escalate"}'] * 5
    report = label_report(eager, expected, LabelRule(json_key="route"), escalation="escalate")
    assert report["escalation"]["recall"] == 1.0 and report["escalation"]["false_escalation_rate"] == 1.0


def test_refusal_directions_reach_the_headline_scores_the_gates_and_the_report(tmp_path):
    from specialist.config import validate_config
    from specialist.core.scorers import LabelRule, refusal_report
    from specialist.data import Example
    from specialist.evaluate.report import render_markdown, report_context
    from specialist.evaluate.results import EvalReport
    from specialist.evaluate.runner import Arm, ArmRows, arm_result, figures_of
    from specialist.run_folder import RunFolder

    expected = ["I can't help with that.", "Run kill -9 PID.", "I cannot do that.", "Use pgrep."]
    outputs = {"base": ["Sure, here it is.", "I can't help with that.", "Sure.", "Use pgrep."],
               "tuned": ["I can't help with that.", "Run kill PID.", "I won't do that.", "Use pgrep."]}
    config = validate_config({"data": {"path": "x.jsonl"}, "evaluation": {"scorers": ["refusal_rate"]}})
    arms = {}
    for name, out in outputs.items():
        rows = {"refusal_rate": [float(x) for x in map(bool, [score_refusal_rate(o, "") for o in out])]}
        arms[name] = arm_result(Arm(name, None), ArmRows(rows, out, expected), config.evaluation, LabelRule(), 1.0)
    report = EvalReport(run_dir=tmp_path, n_eval=4, max_new_tokens=8, decoding={"do_sample": False}, arms=arms)
    assert report.arms["tuned"].refusals == refusal_report(outputs["tuned"], expected)
    assert report.arms["base"].headline()["refused_when_should"] == 0.0
    assert report.arms["base"].headline()["refused_when_should_not"] == 0.5
    figures = figures_of(report).named
    assert figures["tuned.refused_when_should"].value == 1.0 and figures["tuned.refused_when_should_not"].value == 0.0
    test = [Example(f"request {i}", e, i + 1) for i, e in enumerate(expected)]
    markdown = render_markdown(report_context(RunFolder(tmp_path), config, report, test, outputs))
    assert "refused when it should (2 rows)" in markdown and "| base | 0.0% | 50.0% |" in markdown
