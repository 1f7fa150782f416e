"""The cheapest alternatives and the retrieval index: baselines agree with scikit-learn run by hand, never read a
held-out answer, retrieval never hands a row itself or a near duplicate, the lookup check tells recall from skill,
the best-baseline gate, and a retrieval-trained run answers the same through eval, its export and serve."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest

from specialist.core.baselines import lookup_check, linear_answers, majority_answers, training_labels
from specialist.core.retrieval import RetrievalIndex


@dataclass
class Row:
    prompt: str
    completion: str
    label: str | None = None
    group: str | None = None


TICKETS = [
    ("the app crashes when I upload a photo", "bug"), ("crash on startup after the update", "bug"),
    ("stack trace in the logs when saving", "bug"), ("error 500 when I open settings", "bug"),
    ("please add a dark mode", "feature"), ("could you support csv export", "feature"),
    ("add an option to rename folders", "feature"), ("it would be nice to have keyboard shortcuts", "feature"),
    ("how do I reset my password", "question"), ("where can I find my invoices", "question"),
    ("what does the premium plan include", "question"), ("how can I change my email address", "question"),
]


def test_linear_baseline_agrees_with_scikit_learn_run_by_hand():
    from scipy.sparse import hstack
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import normalize

    texts, labels = [t for t, _ in TICKETS], [lab for _, lab in TICKETS]
    queries = ["the page crashes with an error", "how do I add a user", "support for pdf export please"]
    word = TfidfVectorizer(analyzer="word", ngram_range=(1, 2), sublinear_tf=True, token_pattern=r"(?u)\b\w+\b")
    char = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True)
    train = normalize(hstack([word.fit_transform(texts), char.fit_transform(texts)]).tocsr())
    model = LogisticRegression(class_weight="balanced", max_iter=2000, random_state=0).fit(train, labels)
    expected = model.predict_proba(normalize(hstack([word.transform(queries), char.transform(queries)]).tocsr()))

    found = linear_answers(texts, labels, queries)
    assert found.classes == list(model.classes_)
    np.testing.assert_allclose(found.probabilities, expected, rtol=1e-6)
    assert found.labels == [found.classes[i] for i in expected.argmax(axis=1)]
    assert linear_answers(texts, labels, queries).labels == found.labels  # deterministic


def test_majority_answers_the_most_frequent_training_label_and_the_first_seen_on_a_tie():
    assert majority_answers(["b", "a", "a", "c"], 3).labels == ["a", "a", "a"]
    assert majority_answers(["b", "a", "a", "b"], 1).labels == ["b"]
    assert majority_answers(["x"], 0).labels == []


def test_label_baselines_need_every_row_labelled_and_two_classes():
    assert training_labels(RetrievalIndex(["a", "b"], ["x", "y"], ["x", "y"])) == ["x", "y"]
    assert training_labels(RetrievalIndex(["a", "b"], ["x", "y"], ["x", None])) is None
    assert training_labels(RetrievalIndex(["a", "b"], ["x", "x"], ["x", "x"])) is None
    assert training_labels(RetrievalIndex(["a"], ["x"])) is None


def test_nearest_answers_from_training_rows_only_and_never_a_planted_test_answer():
    train = [Row("disk full on node 7", "storage"), Row("user alice failed to log in", "auth"),
             Row("packet lost between routers", "network")]
    index = RetrievalIndex.of_examples(train)
    test = [Row("disk full on node 9", "PLANTED-ANSWER-1"), Row("user bob failed to log in", "PLANTED-ANSWER-2")]
    answers = index.nearest_answers([row.prompt for row in test])
    assert answers == ["storage", "auth"]
    assert not any("PLANTED" in a for a in answers)
    assert all(a in {row.completion for row in train} for a in answers)


def test_retrieval_never_returns_the_row_itself_a_near_duplicate_or_its_group():
    rows = [Row("error reading block 17 on node a", "A", group="g1"),
            Row("error reading block 17 on node a", "A2", group="g2"),  # an exact copy of row 0's input
            Row("error reading block 18 on node b", "B", group="g1"),
            Row("user carol logged out", "C", group="g3"),
            Row("user dave logged out now", "D", group="g4")]
    index = RetrievalIndex.of_examples(rows)
    shots = index.training_shots(k=4, use_groups=True)
    found = index.neighbours(index.inputs, 4, index.groups, list(range(len(rows))))
    for i, row in enumerate(rows):
        assert row.prompt not in [inp for inp, _ in shots[i]]  # itself, and its exact copy
        assert i not in found[i] and all(rows[j].group != row.group for j in found[i])
        assert [(rows[j].prompt, rows[j].completion) for j in reversed(found[i])] == shots[i]
    assert [inp for inp, _ in shots[3]][-1] == "user dave logged out now"  # the most similar sits last
    ungrouped = index.training_shots(k=4, use_groups=False)
    assert "error reading block 18 on node b" in [inp for inp, _ in ungrouped[0]]


def test_near_duplicate_threshold_and_ties_are_deterministic():
    index = RetrievalIndex(["alpha beta", "alpha beta", "gamma delta"], ["1", "2", "3"], near_duplicate=1.0)
    assert index.neighbours(["alpha beta gamma"], 2) == [[0, 1]]  # equal similarity: the earlier row first
    strict = RetrievalIndex(["alpha beta", "alpha beta", "gamma delta"], ["1", "2", "3"], near_duplicate=0.5)
    assert strict.neighbours(["alpha beta"], 3) == [[2]]  # both copies (cosine 1) left out, "gamma delta" kept


def test_an_index_round_trips_and_a_broken_file_is_a_clear_error(tmp_path):
    index = RetrievalIndex(["a b", "c d"], ["x", "y"], ["x", None], [None, "g"], 0.9, 2)
    index.save(tmp_path / "retrieval.json")
    assert [p.name for p in tmp_path.iterdir()] == ["retrieval.json"]  # written aside, renamed into place
    loaded = RetrievalIndex.load(tmp_path / "retrieval.json")
    assert (loaded.inputs, loaded.answers, loaded.labels, loaded.groups, loaded.near_duplicate, loaded.k) == \
        (index.inputs, index.answers, index.labels, index.groups, 0.9, 2)
    assert loaded.prompt_shots(["a b c"]) == index.prompt_shots(["a b c"])
    for text in ("{", "[]", '{"format": 1}', '{"format": 9, "rows": []}', '{"format": 1, "rows": [{"input": 1}]}',
                 '{"format": 1, "rows": [], "k": 0}', '{"format": 1, "rows": [], "k": "3"}'):
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(ValueError, match="bad.json"):
            RetrievalIndex.load(tmp_path / "bad.json")


def test_an_empty_index_and_hostile_queries_answer_without_failing():
    empty = RetrievalIndex([], [])
    assert empty.nearest_answers(["anything"]) == [""]
    assert empty.shots(["x"], 3) == [[]]
    index = RetrievalIndex(["..."], ["punctuation only"])  # no word at all: the character view still works
    assert index.neighbours(["", "\x00\u202e", "a" * 100_000], 1) == [[0], [0], [0]]


def test_the_lookup_check_flags_a_split_that_shares_answers_and_passes_a_grouped_one():
    templates = [f"event {t} happened on host <*>" for t in range(10)]
    rows = [Row(f"event {t} happened on host h{i}", templates[t], group=str(t)) for t in range(10) for i in range(6)]
    shared = lookup_check(rows[::2], {"test": rows[1::2]})  # every template on both sides
    assert shared["warn"] and shared["splits"]["test"]["answer_seen_in_train"] == 1.0
    grouped = lookup_check([r for r in rows if r.group not in "89"], {"test": [r for r in rows if r.group in "89"]})
    assert not grouped["warn"] and grouped["splits"]["test"]["answer_seen_in_train"] == 0.0
    labelled = lookup_check([Row(t, lab, lab) for t, lab in TICKETS[::2]], {"test": [Row(t, lab, lab)
                                                                                  for t, lab in TICKETS[1::2]]})
    assert labelled["labelled"] and not labelled["warn"]  # a label set is finite by design: not recall


def test_the_best_baseline_gate_reads_the_strongest_alternative_per_metric():
    from specialist.core.gates import Figure, Figures, check_gates
    from specialist.core.stats import Interval

    figures = Figures({"tuned.exact_match": Figure(0.9), "best_baseline.exact_match": Figure(0.95)},
                      {("tuned", "best_baseline", "exact_match"): Interval(-0.05, -0.15, 0.04, "newcombe", 60)})
    results = check_gates(["tuned - best_baseline >= 0 on exact_match",
                           "tuned - best_baseline > -0.2 on exact_match confidently",
                           "best_baseline.exact_match <= 0.96"], figures)
    assert [r.passed for r in results] == [False, True, True]


def test_best_baselines_picks_the_highest_alternative_and_ignores_other_arms():
    from specialist.evaluate.baseline_arms import best_baselines
    from specialist.evaluate.results import ArmResult
    from specialist.core.stats import Interval

    def arm(name, value):
        return ArmResult(name, {"exact_match": Interval(value, None, None, "none", 10),
                                "length": Interval(50.0 - value, None, None, "none", 10)}, {})

    arms = {"base": arm("base", 0.0), "nearest": arm("nearest", 0.6), "retrieval": arm("retrieval", 0.6),
            "other_run": arm("other_run", 0.99), "tuned": arm("tuned", 0.7)}
    assert best_baselines(arms) == {"exact_match": "nearest"}  # tie: nearest is listed first; length not compared
    assert best_baselines({k: v for k, v in arms.items() if k != "tuned"}) == {}


def test_refusing_a_best_baseline_gate_when_no_baseline_is_scored():
    from specialist.errors import ConfigError
    from specialist.core.gates import refuse_gates_on_arms_left_out

    refuse_gates_on_arms_left_out(["tuned - best_baseline >= 0 on exact_match"], ["nearest", "tuned"], [])
    with pytest.raises(ConfigError, match="best_baseline"):
        refuse_gates_on_arms_left_out(["tuned - best_baseline >= 0 on exact_match"], ["tuned"], [])


def test_eval_of_labelled_rows_scores_majority_and_linear_on_the_training_split_only(tmp_path, tiny_model_dir):
    from specialist.config import validate_config
    from specialist.evaluate.runner import evaluate_run
    from specialist.pipeline import train_only

    rows = [{"text": f"{text} #{i}", "label": label} for i in range(4) for text, label in TICKETS]
    (tmp_path / "tickets.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = validate_config({
        "data": {"path": str(tmp_path / "tickets.jsonl"), "dedupe": {"near": False}, "split_by": "stratified",
                 "test_fraction": 0.25},
        "model": {"name": str(tiny_model_dir), "dtype": "float32"}, "method": {"r": 4, "alpha": 8},
        "training": {"max_steps": 1, "batch_size": 4, "max_length": 64, "report_to": []},
        "evaluation": {"scorers": ["label_accuracy"], "max_new_tokens": 4, "few_shot_k": 0, "forgetting": False,
                       "train_sample": 0, "bootstrap_samples": 200, "baselines": ["nearest", "majority", "linear"],
                       "gates": ["tuned - best_baseline >= -1 on label_accuracy",
                                 "tuned - best_baseline >= -1 on macro_f1"]},
        "output": {"dir": str(tmp_path / "runs"), "run_name": "tickets"}})
    run = train_only(config, "tickets").run_dir
    report = evaluate_run(run, config)
    assert {"nearest", "majority", "linear", "tuned"} <= set(report.arms)
    predictions = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    train = [json.loads(line) for line in (run / "data" / "train.jsonl").read_text().splitlines()]
    linear = linear_answers([r["prompt"] for r in train], [r["label"] for r in train], [p["input"] for p in predictions])
    assert [p["linear"] for p in predictions] == linear.labels  # the arm is the baseline fitted on train only
    assert report.arms["linear"].labels["macro_f1"] >= 0.5  # the words give these tickets away
    assert report.best_baseline["label_accuracy"] in ("nearest", "majority", "linear")
    assert all(gate.passed for gate in report.gates)
    # macro-F1, a figure of the whole set, is compared on resampled rows like every per-row score
    from specialist.core.labels import label_rule
    from specialist.core.stats import paired_macro_f1

    rule = label_rule(config.evaluation)
    want = [rule.extract(p["expected"]) for p in predictions]
    by_hand = paired_macro_f1(want, [rule.extract(p["linear"]) for p in predictions],
                              [rule.extract(p["tuned"]) for p in predictions], 200)
    assert report.comparison("tuned", "linear", "macro_f1") == by_hand
    saved = json.loads((run / "eval.json").read_text())
    assert saved["comparisons"]["tuned_vs_linear"]["macro_f1"]["test"] == "approximate randomization"
    best = report.best_baseline["macro_f1"]
    assert saved["best_baseline"]["macro_f1"]["comparison"] == json.loads(json.dumps(
        report.comparison("tuned", best, "macro_f1").as_dict()))


@pytest.fixture(scope="module")
def retrieval_run(tmp_path_factory, tiny_model_dir):
    """A tiny LoRA run trained with data.retrieval (k=2), evaluated one row at a time (no padding), exported."""
    from specialist.config import validate_config
    from specialist.deploy.export import ExportOptions, export_run
    from specialist.evaluate.runner import evaluate_run
    from specialist.pipeline import train_only
    from tests.conftest import LOG_EXAMPLES

    tmp = tmp_path_factory.mktemp("retrieval-run")
    rows = [{"prompt": f"{LOG_EXAMPLES[i % 3][0]} #{i}", "completion": json.dumps(LOG_EXAMPLES[i % 3][1])}
            for i in range(30)]
    (tmp / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = validate_config({
        "data": {"path": str(tmp / "data.jsonl"), "dedupe": {"near": False}, "retrieval": {"k": 2}},
        "model": {"name": str(tiny_model_dir), "dtype": "float32"}, "method": {"r": 4, "alpha": 8},
        "training": {"max_steps": 2, "batch_size": 4, "max_length": 256, "learning_rate": 0.05, "report_to": []},
        "evaluation": {"max_new_tokens": 6, "batch_size": 1, "few_shot_k": 0, "forgetting": False,
                       "train_sample": 0, "bootstrap_samples": 200, "skip_base": True},
        "output": {"dir": str(tmp / "runs"), "run_name": "retrieval"}})
    run = train_only(config, "retrieval").run_dir
    report = evaluate_run(run, config)
    export = export_run(run, "adapter", out=tmp / "export", options=ExportOptions(golden=3, max_new_tokens=6))
    return run, report, export.folder


def test_a_retrieval_run_trains_evaluates_and_exports_with_its_index(retrieval_run):
    from specialist.core.retrieval import RetrievalIndex
    from specialist.data import read_split
    from specialist.run_folder import ExportFolder, RunFolder

    run, report, export = retrieval_run
    index = RunFolder(run).retrieval()
    split = read_split(run / "data")
    assert index.inputs == [ex.prompt for ex in split.train] and index.k == 2
    assert not any(ex.prompt in [inp for inp, _ in shots]
                   for ex, shots in zip(split.test, index.prompt_shots([ex.prompt for ex in split.test])))
    assert "nearest" in report.arms and "tuned" in report.arms
    exported = ExportFolder(export)
    assert RetrievalIndex.load(exported.retrieval_file).inputs == index.inputs
    assert json.loads(exported.meta_file.read_text())["retrieval"] == {"file": "retrieval.json", "k": 2}
    assert "most similar training rows" in exported.model_card.read_text()


def test_training_rows_carry_their_neighbours_in_the_prompt(retrieval_run, tiny_model_dir):
    from transformers import AutoTokenizer

    from specialist.data import encode_for_training
    from specialist.pipeline import with_retrieval
    from specialist.run_folder import RunFolder

    run, _, _ = retrieval_run
    folder = RunFolder(run)
    split, template = folder.split(), folder.template()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    shown = with_retrieval(folder.config(), split, folder)
    assert all(len(ex.shots) == 2 and ex.prompt not in [i for i, _ in ex.shots] for ex in shown.train)
    plain = encode_for_training(template, tokenizer, split.train[0].prompt, split.train[0].completion)
    with_shots = encode_for_training(template, tokenizer, shown.train[0].prompt, shown.train[0].completion,
                                     shown.train[0].shots)
    assert sum(with_shots["completion_mask"]) == sum(plain["completion_mask"])  # the loss is on the answer only
    text = tokenizer.decode(with_shots["input_ids"])
    assert all(shot_input in text for shot_input, _ in shown.train[0].shots)


def test_serve_answers_a_retrieval_export_as_eval_did(retrieval_run, tmp_path):
    import httpx

    from specialist.deploy.arms import load_arms
    from specialist.deploy.serve import BackgroundServer, ServeSettings, create_app

    run, _, export = retrieval_run
    predictions = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    arms = load_arms([("tuned", str(export))])
    assert arms["tuned"].engine.retrieval is not None
    settings = ServeSettings(split={"tuned": 1.0}, db=tmp_path / "log.sqlite", max_tokens_limit=64,
                             max_prompt_tokens=1024)
    with BackgroundServer(create_app(arms, settings)) as server:
        for row in predictions:
            body = {"model": "tuned", "max_tokens": 6, "messages": [{"role": "user", "content": row["input"]}]}
            answer = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60).json()
            assert answer["choices"][0]["message"]["content"] == row["tuned"]


def test_the_baselines_command_scores_the_cheap_alternatives_before_any_training(tiny_config, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from specialist.cli import app

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config))
    result = CliRunner().invoke(app, ["baselines", str(config), "--json", str(tmp_path / "b.json"),
                                      "--out", str(tmp_path / "prepared")], terminal_width=200)
    assert result.exit_code == 0, result.output
    scores = json.loads((tmp_path / "b.json").read_text())
    assert set(scores) == {"nearest"}  # unlabelled rows: no majority or linear
    # the tiny data repeats three lines with a counter: the nearest training line has the same answer
    assert scores["nearest"]["scores"]["exact_match"]["mean"] == 1.0
    assert "nearest" in result.output and not (tmp_path / "runs").exists()  # no run folder, no model trained


def test_prepare_reports_the_lookup_check_and_skips_it_on_a_training_split_too_big_to_check(log_data, tmp_path,
                                                                                            monkeypatch):
    import specialist.core.baselines as baselines
    from specialist.config import validate_config
    from specialist.data import prepare

    data = validate_config({"data": {"path": str(log_data), "dedupe": {"near": False}}}).data
    report = prepare(data, "lora", tmp_path / "small", 0).report
    # three log lines repeated with a counter: every held-out answer was seen, and the nearest line is right
    assert report["lookup"]["warn"] and report["lookup"]["splits"]["test"]["nearest_exact"] == 1.0
    monkeypatch.setattr(baselines, "LOOKUP_MAX_TRAIN", 5)
    skipped = prepare(data, "lora", tmp_path / "big", 0).report["lookup"]
    assert "skipped" in skipped and "specialist baselines" in skipped["skipped"]


def test_an_index_queried_from_many_threads_at_once_answers_as_from_one(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    rows = [Row(f"user u{i} logged {'in' if i % 2 else 'out'} from host h{i % 5}", str(i)) for i in range(200)]
    alone = RetrievalIndex.of_examples(rows).prompt_shots(["user u7 logged in from host h2"])
    shared = RetrievalIndex.of_examples(rows)  # not fitted yet: the first queries race to fit it
    with ThreadPoolExecutor(8) as pool:
        found = list(pool.map(lambda _: shared.prompt_shots(["user u7 logged in from host h2"]), range(32)))
    assert all(f == alone for f in found)


@pytest.mark.parametrize(("section", "why"), [
    ({"data": {"retrieval": {"k": 0}}}, "data.retrieval.k"),
    ({"data": {"retrieval": {"k": 2, "near_duplicate": 1.5}}}, "near_duplicate"),
    ({"data": {"retrieval": {"k": 2, "fields": ["x"]}}}, "fields"),
    ({"data": {"retrieval": {"k": 2}}, "method": {"kind": "dpo"}}, "remove data.retrieval"),
    ({"evaluation": {"baselines": ["nearest", "oracle"]}}, "oracle"),
    ({"evaluation": {"retrieval_k": 100}}, "retrieval_k"),
    ({"evaluation": {"gates": ["tuned - best_baseline >= x on exact_match"]}}, "cannot read gate"),
])
def test_bad_baseline_and_retrieval_settings_are_refused_with_their_key(section, why):
    from specialist.config import validate_config
    from specialist.errors import ConfigError

    config = {"data": {"path": "d.jsonl", **section.get("data", {})},
              **{k: v for k, v in section.items() if k != "data"}}
    with pytest.raises(ConfigError, match=why):
        validate_config(config)


def test_a_save_killed_midway_leaves_the_previous_index_whole(tmp_path, monkeypatch):
    from pathlib import Path

    path = tmp_path / "retrieval.json"
    RetrievalIndex(["old input"], ["old answer"]).save(path)
    real_write = Path.write_text

    def killed(self, text, *args, **kwargs):
        real_write(self, text[: len(text) // 2], *args, **kwargs)  # half written, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", killed)
    with pytest.raises(KeyboardInterrupt):
        RetrievalIndex(["new input"] * 50, ["new answer"] * 50).save(path)
    monkeypatch.setattr(Path, "write_text", real_write)
    assert RetrievalIndex.load(path).inputs == ["old input"]
