"""method.kind classifier: a sequence-classification head with LoRA and a class-weighted loss; evaluated without
generation; refused (clearly) by export and serve."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from specialist.classify import HeadSpec, LabelClassifier, classifier_from_causal, load_classifier
from specialist.config import validate_config
from specialist.data import Example, PromptTemplate
from specialist.errors import ConfigError, DataError
from specialist.run_folder import RunFolder
from specialist.train.classifier import class_labels, class_weights, weighted_loss

WORDS = {"major": "block", "minor": "user", "critical": "null"}


def rows(labels: list[str]) -> list[Example]:
    return [Example(f"text {i}", label, i + 1, label=label) for i, label in enumerate(labels)]


@pytest.fixture
def severity_data(tmp_path):
    """100 labelled rows, 70% major, 20% minor, 10% critical; one telling word each (the task is learnable)."""
    path = tmp_path / "issues.jsonl"
    labels = ["major" if i % 10 < 7 else "minor" if i % 10 < 9 else "critical" for i in range(100)]
    path.write_text("".join(json.dumps({"text": f"{WORDS[label]} report {i}", "label": label}) + "\n"
                            for i, label in enumerate(labels)))
    return path


def classifier_config(tmp_path, tiny_model_dir, data_file, **overrides):
    config = {
        "data": {"path": str(data_file), "dedupe": {"near": False}, "split_by": "stratified", "test_fraction": 0.2,
                 "label_template": '{"severity": "{label}"}'},
        "model": {"name": str(tiny_model_dir), "dtype": "float32"},
        "method": {"kind": "classifier", "r": 8, "alpha": 16},
        "training": {"max_steps": 30, "batch_size": 8, "max_length": 64, "learning_rate": 0.01, "logging_steps": 5,
                     "report_to": []},
        "evaluation": {"scorers": ["label_accuracy", "exact_match"], "label_json_key": "severity",
                       "escalation_label": "critical", "few_shot_k": 0, "forgetting": False, "max_new_tokens": 8,
                       "batch_size": 8, "gates": ["tuned.macro_f1 >= 0.9", "tuned.ece <= 0.5"]},
        "output": {"dir": str(tmp_path / "runs"), "run_name": "severity"},
    }
    for section, values in overrides.items():
        config[section].update(values)
    return validate_config(config)


# -- classes and weights -----------------------------------------------------------------------------------------
def test_balanced_weights_are_inverse_frequency_and_average_one_over_the_rows():
    train = rows(["a"] * 6 + ["b"] * 3 + ["c"])
    weights = class_weights(["a", "b", "c"], train, "balanced")
    assert weights == pytest.approx([10 / (3 * 6), 10 / (3 * 3), 10 / (3 * 1)])
    per_row = [weights["abc".index(ex.label)] for ex in train]
    assert sum(per_row) / len(per_row) == pytest.approx(1.0)  # the loss keeps the unweighted scale
    assert class_weights(["a", "b", "c"], train, "none") == [1.0, 1.0, 1.0]


def test_a_declared_class_without_rows_gets_no_weight_and_the_others_stay_balanced():
    weights = class_weights(["a", "ghost", "b"], rows(["a", "a", "b", "b"]), "balanced")
    assert weights == [1.0, 0.0, 1.0]


def test_classes_come_from_data_labels_in_order_else_sorted_from_the_rows():
    assert class_labels(["z", "a"], rows(["a", "z"])) == ["z", "a"]
    assert class_labels(None, rows(["pear", "apple", "pear"])) == ["apple", "pear"]


def test_rows_without_a_label_or_a_single_class_are_refused_with_the_fix():
    with pytest.raises(DataError, match="label on every row") as caught:
        class_labels(None, [Example("x", "y", 7)])
    assert "data.shape: labelled" in caught.value.hint
    with pytest.raises(DataError, match="at least two classes"):
        class_labels(None, rows(["only", "only"]))


def test_weighted_loss_is_the_weighted_mean_and_does_not_change_with_micro_batches():
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 3), torch.tensor([0, 0, 0, 1, 2, 2])
    weights = [0.5, 2.0, 1.0]
    loss = weighted_loss(weights)
    by_hand = sum(weights[y] * -torch.log_softmax(logits[i], -1)[y] for i, y in enumerate(labels.tolist())) / 6
    assert loss({"logits": logits}, labels).item() == pytest.approx(by_hand.item(), rel=1e-6)
    halves = sum(loss({"logits": logits[s]}, labels[s], num_items_in_batch=6) for s in (slice(0, 2), slice(2, 6)))
    assert halves.item() == pytest.approx(by_hand.item(), rel=1e-6)


# -- the head ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("head", ["transformers", "last_token"])
def test_the_head_shares_the_decoder_and_reads_the_last_real_token_of_padded_rows(tiny_model, head):
    causal, tokenizer = tiny_model
    model, kind = classifier_from_causal(causal, 3, tokenizer.pad_token_id, head)
    assert kind == head
    assert model.model is causal.model  # the decoder is shared, not loaded twice
    assert not any(p.is_meta for p in model.parameters())
    model.eval()
    short, long = [2, 10, 11], [2, 10, 11, 12, 13, 14]
    batch = torch.tensor([short + [tokenizer.pad_token_id] * 3, long])
    mask = torch.tensor([[1] * 3 + [0] * 3, [1] * 6])
    with torch.no_grad():
        together = model(input_ids=batch, attention_mask=mask).logits
        alone = [model(input_ids=torch.tensor([r]), attention_mask=torch.ones(1, len(r), dtype=torch.long)).logits[0]
                 for r in (short, long)]
    assert together.shape == (2, 3)
    assert torch.allclose(together, torch.stack(alone), atol=1e-5)


def test_auto_picks_transformers_class_where_the_architecture_has_one(tiny_model):
    from transformers import LlamaForSequenceClassification

    causal, tokenizer = tiny_model
    model, kind = classifier_from_causal(causal, 4, tokenizer.pad_token_id)
    assert kind == "transformers" and isinstance(model, LlamaForSequenceClassification)
    assert model.config.num_labels == 4 and model.config.pad_token_id == tokenizer.pad_token_id


# -- a whole run -------------------------------------------------------------------------------------------------
def test_classifier_run_learns_imbalanced_classes_and_is_scored_without_generation(tmp_path, tiny_model_dir,
                                                                                   severity_data, monkeypatch):
    from specialist.evaluate import runner
    from specialist.pipeline import run

    generated: list[str] = []
    plain_generate = runner.generate

    def recording(*args, **kwargs):  # which arms generate: the base does, the classifier must not
        generated.append(args[5] if len(args) > 5 else kwargs.get("label", ""))
        return plain_generate(*args, **kwargs)

    monkeypatch.setattr(runner, "generate", recording)
    summary = run(classifier_config(tmp_path, tiny_model_dir, severity_data), "severity")
    folder = RunFolder(summary.run_dir)
    assert json.loads(folder.labels_file.read_text())["labels"] == ["critical", "major", "minor"]
    assert all("tuned" not in label for label in generated) and any("base" in label for label in generated)
    report = json.loads(folder.eval_json.read_text())
    tuned = report["arms"]["tuned"]
    assert tuned["labels"]["macro_f1"] == 1.0  # every class found, the rare ones too (no collapse onto "major")
    assert tuned["calibration"]["rows"] == summary.evaluation.n_eval == 20
    assert [row["threshold"] for row in tuned["calibration"]["escalation"]["thresholds"]] == pytest.approx(
        [0.1 * t for t in range(1, 10)])
    assert all(gate["passed"] for gate in report["gates"])
    predictions = [json.loads(line) for line in folder.predictions.read_text().splitlines()]
    for row in predictions:
        probabilities = row["probabilities"]["tuned"]
        assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-4)
        best = max(probabilities, key=probabilities.get)
        assert row["tuned"] == f'{{"severity": "{best}"}}'  # the label, through data.label_template
    html = folder.report_html.read_text()
    assert "Calibration" in html and "reliability diagram" in html
    assert (folder.figures / "reliability.png").stat().st_size > 1000


def test_the_saved_head_and_adapter_load_back_to_the_same_answers(tmp_path, tiny_model_dir, severity_data):
    from specialist.pipeline import train_only

    config = classifier_config(tmp_path, tiny_model_dir, severity_data, training={"max_steps": 4})
    run = RunFolder(train_only(config, "severity").run_dir)
    prompts = [f"{word} report 1000" for word in WORDS.values()]
    torch.manual_seed(1)  # a head left at its random start would differ between two loads
    first = load_classifier(run).probabilities(prompts)
    torch.manual_seed(2)
    second = load_classifier(run).probabilities(prompts)
    np.testing.assert_allclose(first, second, atol=1e-6)
    assert first.shape == (3, 3)


def test_architectures_without_a_transformers_head_train_ours_and_load_it_back(tmp_path, tiny_model_dir,
                                                                             severity_data, monkeypatch):
    from specialist import classify as classifier
    from specialist.pipeline import train_only

    monkeypatch.setattr(classifier, "sequence_classification_class", lambda config: None)
    config = classifier_config(tmp_path, tiny_model_dir, severity_data, training={"max_steps": 4})
    run = RunFolder(train_only(config, "severity").run_dir)
    assert json.loads(run.labels_file.read_text())["head"] == "last_token"
    loaded = load_classifier(run)
    assert isinstance(loaded.model.base_model.model, classifier.LastTokenClassifier)
    torch.manual_seed(3)
    np.testing.assert_allclose(loaded.probabilities(["null report 5"]),
                               load_classifier(run).probabilities(["null report 5"]), atol=1e-6)


def test_serve_answers_the_label_with_its_probabilities_and_export_refuses(tmp_path, tiny_model_dir,
                                                                          severity_data):
    import httpx

    from specialist.deploy.arms import load_arms
    from specialist.deploy.export import export_run
    from specialist.deploy.serve import BackgroundServer, ServeSettings, create_app
    from specialist.pipeline import train_only

    config = classifier_config(tmp_path, tiny_model_dir, severity_data, training={"max_steps": 4})
    run = RunFolder(train_only(config, "severity").run_dir)
    expected = load_classifier(run).probabilities(["null report 77"])[0]
    arms = load_arms([("tuned", str(run.path))])
    settings = ServeSettings(split={"tuned": 1.0}, db=tmp_path / "log.sqlite", log_prompts=True)
    body = {"model": "tuned", "messages": [{"role": "user", "content": "null report 77"}], "temperature": 0.9}
    with BackgroundServer(create_app(arms, settings)) as server:
        answer = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30).json()["choices"][0]
        streamed = httpx.post(f"{server.url}/v1/chat/completions", json={**body, "stream": True}, timeout=30).text
    labels = ["critical", "major", "minor"]
    assert answer["probabilities"] == pytest.approx(dict(zip(labels, expected)), abs=1e-6)
    assert answer["message"]["content"] == f'{{"severity": "{labels[int(expected.argmax())]}"}}'
    assert answer["finish_reason"] == "stop"
    chunks = [json.loads(line[6:]) for line in streamed.splitlines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == answer["message"]["content"]
    assert chunks[-1]["choices"][0]["probabilities"] == pytest.approx(answer["probabilities"])
    with pytest.raises(ConfigError, match="classifier run") as caught:
        export_run(run.path, "merged", tmp_path / "out")
    assert "specialist serve --arm" in caught.value.hint


def test_a_damaged_label_file_is_a_clear_error_not_a_traceback(tmp_path, tiny_model_dir, severity_data):
    from specialist.pipeline import train_only

    config = classifier_config(tmp_path, tiny_model_dir, severity_data, training={"max_steps": 1})
    run = RunFolder(train_only(config, "severity").run_dir)
    for damage in ("{not json", '{"labels": ["one"], "head": "transformers"}', '{"labels": [1, 2], "head": "x"}',
                   "[]", '{"labels": ["a", "b"], "head": "../../etc"}'):
        run.labels_file.write_text(damage)
        with pytest.raises(ConfigError, match="labels.json"):
            load_classifier(run)


# -- config ------------------------------------------------------------------------------------------------------
def test_config_checks_the_classifier_keys(tmp_path, tiny_model_dir, severity_data):
    with pytest.raises(ConfigError, match="labelled rows"):
        classifier_config(tmp_path, tiny_model_dir, severity_data, data={"shape": "prompt_completion"})
    with pytest.raises(ConfigError, match="class_weights"):
        classifier_config(tmp_path, tiny_model_dir, severity_data, method={"class_weights": "inverse"})
    with pytest.raises(ConfigError, match="adapter"):
        classifier_config(tmp_path, tiny_model_dir, severity_data, method={"adapter": False})
    assert classifier_config(tmp_path, tiny_model_dir, severity_data).method.uses_lora


def test_prompts_past_max_length_keep_their_end_where_the_head_reads(tiny_model):
    causal, tokenizer = tiny_model
    model, _ = classifier_from_causal(causal, 2, tokenizer.pad_token_id)
    template = PromptTemplate.for_tokenizer(tokenizer, "Classify.")
    classifier = LabelClassifier(model.eval(), tokenizer, template, ["a", "b"], max_length=16)
    found = classifier.probabilities(["block " * 500, "", "\x00\ufffd<eos> {label}"], batch_size=2)
    assert found.shape == (3, 2) and np.allclose(found.sum(axis=1), 1.0)


# -- reading a long input in windows ------------------------------------------------------------------------------
def test_windows_cover_the_input_once_in_order():
    from specialist.classify import windows_of, windowed_batch

    ids = list(range(1, 12))
    assert windows_of(ids, 4) == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11]]
    assert windows_of(ids, None) == [ids] and windows_of(ids, 11) == [ids] and windows_of([], 4) == [[]]
    batch = windowed_batch([ids, [1, 2]], pad_id=0, window=4)
    assert batch["window_row"].tolist() == [0, 0, 0, 1]
    assert batch["attention_mask"].sum().item() == 13  # every token once, padding masked
    assert "window_row" not in windowed_batch([[1, 2], [3]], pad_id=0, window=4)


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_pooled_windows_equal_each_window_read_alone_then_pooled(tiny_model, pooling):
    """A row read in windows is pooled exactly as its windows read one by one (mean: weighted by their real tokens),
    and its neighbour in the batch changes nothing."""
    from specialist.classify import PooledClassifier, windowed_batch

    causal, tokenizer = tiny_model
    model, kind = classifier_from_causal(causal, 3, tokenizer.pad_token_id, "pooled", pooling)
    assert kind == "pooled" and isinstance(model, PooledClassifier) and model.model is causal.model
    model.eval()
    long, short = list(range(10, 21)), [2, 10, 11]
    with torch.no_grad():
        together = model(**windowed_batch([long, short], tokenizer.pad_token_id, 4)).logits
        states = [model.hidden_states(torch.tensor([w]), torch.ones(1, len(w), dtype=torch.long))[0]
                  for w in ([10, 11, 12, 13], [14, 15, 16, 17], [18, 19, 20])]
        if pooling == "mean":
            by_hand = torch.cat(states).mean(0)  # every token of the row alike, whichever window it fell in
        else:
            by_hand = torch.stack([s[-1] for s in states]).mean(0)
        alone_short = model(**windowed_batch([short], tokenizer.pad_token_id, 4)).logits[0]
    assert together.shape == (2, 3)
    assert torch.allclose(together[0], model.score(by_hand), atol=1e-5)
    assert torch.allclose(together[1], alone_short, atol=1e-5)


def test_a_windowed_mean_pooled_run_trains_saves_and_loads_back_whole(tmp_path, tiny_model_dir, severity_data):
    from specialist.classify import PooledClassifier, read_labels
    from specialist.pipeline import train_only

    config = classifier_config(tmp_path, tiny_model_dir, severity_data, training={"max_steps": 4},
                               method={"pooling": "mean", "window": 16})
    run = RunFolder(train_only(config, "severity").run_dir)
    labels, spec = read_labels(run)
    assert (spec.head, spec.pooling, spec.window) == ("pooled", "mean", 16)
    loaded = load_classifier(run)
    assert isinstance(loaded.model.base_model.model, PooledClassifier) and loaded.window == 16
    long_prompt = "null " * 40  # several windows of 16 tokens, none of them cut away
    assert len(loaded.encode(long_prompt)) > 32
    torch.manual_seed(4)
    np.testing.assert_allclose(loaded.probabilities([long_prompt, "block report 3"]),
                               load_classifier(run).probabilities([long_prompt, "block report 3"]), atol=1e-6)


def test_a_label_file_from_before_pooling_reads_as_last_token_whole(tmp_path):
    from specialist.classify import read_labels

    run = RunFolder(tmp_path)
    run.labels_file.write_text('{"labels": ["a", "b"], "head": "last_token", "class_weights": [1, 1]}')
    assert read_labels(run)[1] == HeadSpec("last_token")
    for damage in ('{"labels": ["a", "b"], "head": "pooled", "pooling": "max"}',
                   '{"labels": ["a", "b"], "head": "pooled", "window": -3}',
                   '{"labels": ["a", "b"], "head": "pooled", "window": "16"}'):
        run.labels_file.write_text(damage)
        with pytest.raises(ConfigError, match="labels.json"):
            read_labels(run)


def test_window_and_pooling_are_refused_outside_a_classifier_or_past_max_length(tmp_path, tiny_model_dir,
                                                                              severity_data):
    with pytest.raises(ConfigError, match="method.window"):
        classifier_config(tmp_path, tiny_model_dir, severity_data, method={"kind": "lora", "window": 16})
    with pytest.raises(ConfigError, match="method.window"):
        classifier_config(tmp_path, tiny_model_dir, severity_data, method={"kind": "lora", "pooling": "mean"})
    with pytest.raises(ConfigError, match="longer than training.max_length"):
        classifier_config(tmp_path, tiny_model_dir, severity_data, method={"window": 128})
    for bad in (0, 8, "wide", 10**6):
        with pytest.raises(ConfigError, match="window"):
            classifier_config(tmp_path, tiny_model_dir, severity_data, method={"window": bad})
    with pytest.raises(ConfigError, match="pooling"):
        classifier_config(tmp_path, tiny_model_dir, severity_data, method={"pooling": "max"})
