import math

import pytest
import torch

from specialist.evaluate.forgetting import (
    DEFAULT_PROBE_SIZE,
    general_text,
    knowledge_accuracy,
    knowledge_probe,
    perplexity,
    probe_prompt,
    read_probe,
)


def test_bundled_references_are_there():
    assert len(general_text()) == 300 and len(general_text(limit=10)) == 10
    everything = read_probe()
    assert len(everything) == 285 + 1542 and len({q["subject"] for q in everything}) == 57
    assert all(q["answer"] in "ABCD" and len(q["choices"]) == 4 and q["question"] for q in everything)
    assert len(knowledge_probe()) == DEFAULT_PROBE_SIZE == 300
    assert knowledge_probe(size=0) == knowledge_probe(size=None) == everything


def test_replacement_corpus_is_read_one_text_a_line(tmp_path):
    corpus = tmp_path / "docs.txt"
    corpus.write_text("first doc\n\nsecond doc\n")
    assert general_text(corpus) == ["first doc", "second doc"]


def test_batched_padded_perplexity_equals_the_per_text_reference(tiny_model):
    model, tokenizer = tiny_model
    texts = ["Dec 10 06:55:46 LabSZ sshd[24200]: Invalid user", "INFO dfs.DataNode", "null true false 0123 blk"]
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            n = ids.shape[1] - 1
            total += model(input_ids=ids, labels=ids).loss.item() * n
            count += n
    assert perplexity(model, tokenizer, texts, batch_size=2) == pytest.approx(math.exp(total / count), rel=1e-4)


def test_batched_knowledge_probe_equals_one_question_at_a_time(tiny_model):
    model, tokenizer = tiny_model
    questions = knowledge_probe()[:6]
    letter_ids = [tokenizer(f" {x}", add_special_tokens=False)["input_ids"][-1] for x in "ABCD"]
    picks = []
    with torch.no_grad():
        for q in questions:
            ids = tokenizer(probe_prompt(q), return_tensors="pt")["input_ids"]
            picks.append("ABCD"[int(model(input_ids=ids).logits[0, -1, letter_ids].argmax())])
    rigged = [dict(q, answer=p) for q, p in zip(questions, picks)]
    assert knowledge_accuracy(model, tokenizer, rigged, batch_size=4) == 1.0
    wrong = [dict(q, answer="ABCD"[("ABCD".index(p) + 1) % 4]) for q, p in zip(questions, picks)]
    assert knowledge_accuracy(model, tokenizer, wrong, batch_size=4) == 0.0


# ---------------------------------------------------------------- a probe with power, and intervals on the change
import json  # noqa: E402
from collections import Counter  # noqa: E402

from specialist.core.gates import check_gates  # noqa: E402
from specialist.errors import DataError  # noqa: E402
from specialist.evaluate import forgetting  # noqa: E402
from specialist.evaluate.forgetting import (  # noqa: E402
    forgetting_figures,
    forgetting_report,
    measure,
    stratified_sample,
    text_losses,
)
from specialist.logits import completion_loss  # noqa: E402

TEXTS = ["Dec 10 06:55:46 LabSZ sshd[24200]: Invalid user", "INFO dfs.DataNode", "null true false 0123 blk",
         "The river flows north through the valley.", "blk_38865 terminating", "x"] * 3


def test_the_probe_sample_is_deterministic_and_stratified_round_robin_over_subjects():
    everything = read_probe()
    sample = knowledge_probe()
    assert sample == knowledge_probe()  # the same questions every run
    counts = Counter(q["subject"] for q in sample)
    assert len(counts) == 57 and max(counts.values()) - min(counts.values()) <= 1  # 300 = 57 x 5 + 15
    first_round = knowledge_probe(size=57)
    subjects = sorted({q["subject"] for q in everything})
    assert [q["subject"] for q in first_round] == subjects  # alphabetical, one each
    def length(q):
        return len(q["question"]) + sum(len(c) for c in q["choices"])

    shortest = {s: min(length(q) for q in everything if q["subject"] == s) for s in subjects}
    assert [length(q) for q in first_round] == [shortest[s] for s in subjects]  # each subject's shortest first
    assert sample[:57] == first_round
    assert sum(map(length, sample)) < 0.7 * sum(map(length, everything)) / len(everything) * len(sample)


def test_stratified_sample_lets_a_subject_that_runs_out_drop_out_of_the_rotation():
    questions = [{"subject": "b", "id": i} for i in range(5)] + [{"subject": "a", "id": 10}] + [{"id": 20}]
    assert [q["id"] for q in stratified_sample(questions, 5)] == [20, 10, 0, 1, 2]  # equal lengths keep file order
    assert stratified_sample(questions, 100) == questions and stratified_sample(questions, 0) == questions
    assert stratified_sample([], 10) == []


def test_a_replacement_probe_is_read_and_its_mistakes_named_by_line(tmp_path):
    good = {"question": "2 + 2?", "choices": ["3", "4", "5", "6"], "answer": "B"}
    path = tmp_path / "probe.jsonl"
    odd = {**good, "question": "two\u2028lines\x85?", "subject": "maths"}  # not line ends in JSONL
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(odd, ensure_ascii=False) + "\n", encoding="utf-8")
    assert knowledge_probe(path, size=1) == [good] and knowledge_probe(path, size=0) == [good, odd]
    for line, problem in [("not json", "not valid JSON"), ("[1, 2]", "expected a JSON object"),
                          (json.dumps({**good, "answer": "E"}), "'answer' must be one of A, B, C, D"),
                          (json.dumps({**good, "choices": ["1", "2"]}), "'choices' must be a list of 4 strings"),
                          (json.dumps({**good, "question": ""}), "'question' must be a non-empty string")]:
        path.write_text(json.dumps(good) + "\n" + line + "\n")
        with pytest.raises(DataError, match=f"probe.jsonl:2: .*{problem}"):
            read_probe(path)
    path.write_text("\n\n")
    with pytest.raises(DataError, match="no questions"):
        read_probe(path)
    with pytest.raises(DataError, match="cannot read the knowledge probe"):
        read_probe(tmp_path / "missing.jsonl")


@torch.inference_mode()
def _perplexity_before_this_change(model, tokenizer, texts, batch_size=16):
    """The implementation this module had before per-text bookkeeping: one summed loss per batch."""
    total, count = 0.0, 0
    tokenizer.padding_side = "right"
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}
        total += float(completion_loss(model, inputs, num_items=1))
        count += int((labels[:, 1:] != -100).sum())
    return math.exp(total / count)


@torch.inference_mode()
def _knowledge_before_this_change(model, tokenizer, questions, batch_size=8):
    """The probe as it was: batches in the given order, one accuracy figure out."""
    letter_ids = [tokenizer(f" {x}", add_special_tokens=False)["input_ids"][-1] for x in "ABCD"]
    tokenizer.padding_side = "left"
    correct = 0
    for start in range(0, len(questions), batch_size):
        chunk = questions[start : start + batch_size]
        batch = tokenizer([probe_prompt(q) for q in chunk], return_tensors="pt", padding=True)
        picked = model(**batch, logits_to_keep=1).logits[:, -1, letter_ids].argmax(dim=-1).tolist()
        correct += sum("ABCD"[p] == q["answer"] for p, q in zip(picked, chunk))
    return correct / len(questions)


def _short_questions(n):
    """The bundled questions with the shortest prompts: real MMLU text, quick for a random tiny model."""
    return sorted(read_probe(), key=lambda q: len(probe_prompt(q)))[:n]


def test_perplexity_is_the_same_number_as_before_and_per_text_losses_add_up_to_it(tiny_model):
    model, tokenizer = tiny_model
    old = _perplexity_before_this_change(model, tokenizer, TEXTS, batch_size=4)
    assert perplexity(model, tokenizer, TEXTS, batch_size=4) == pytest.approx(old, rel=1e-6)
    losses = text_losses(model, tokenizer, TEXTS, batch_size=4)
    with torch.no_grad():
        for text, (loss, tokens) in zip(TEXTS, losses):
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            assert tokens == ids.shape[1] - 1
            assert loss == pytest.approx(model(input_ids=ids, labels=ids).loss.item() * tokens, rel=1e-5, abs=1e-6)


def test_the_soft_capped_head_path_gives_the_same_per_text_losses(tiny_model, monkeypatch):
    model, tokenizer = tiny_model
    chunked = text_losses(model, tokenizer, TEXTS, batch_size=5)
    monkeypatch.setattr(forgetting, "head_can_be_chunked", lambda *_: False)
    plain = text_losses(model, tokenizer, TEXTS, batch_size=5)
    assert [t for _, t in plain] == [t for _, t in chunked]
    assert [loss for loss, _ in plain] == pytest.approx([loss for loss, _ in chunked], rel=1e-5)


def test_bookkeeping_costs_no_extra_forward_pass(tiny_model):
    model, tokenizer = tiny_model
    questions = _short_questions(20)
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        old_ppl = _perplexity_before_this_change(model, tokenizer, TEXTS)
        old_knowledge = _knowledge_before_this_change(model, tokenizer, questions)
        before_change = len(calls)
        calls.clear()
        measured = measure(model, tokenizer, TEXTS, questions)
    finally:
        handle.remove()
    assert len(calls) == before_change == math.ceil(len(TEXTS) / 16) + math.ceil(len(questions) / 8)
    assert len(measured["text_losses"]) == len(TEXTS) and len(measured["correct"]) == len(questions)
    assert measured["perplexity"] == pytest.approx(old_ppl, rel=1e-6) and measured["knowledge"] == old_knowledge


def test_forgetting_report_puts_intervals_on_both_changes(tiny_model):
    from conftest import build_tiny_model

    model, tokenizer = tiny_model
    other = build_tiny_model(tokenizer, seed=1)  # different weights: the "tuned" model
    questions = _short_questions(40)
    before, after = measure(model, tokenizer, TEXTS, questions), measure(other, tokenizer, TEXTS, questions)
    typed = forgetting_report(before, after, len(TEXTS), len(questions), "tiny", samples=500)
    report = json.loads(json.dumps(typed.to_json()))  # eval.json must hold it, with these keys
    assert {"ppl_increase", "knowledge_drop", "before", "after", "texts", "questions", "corpus"} <= set(report)
    assert report["before"] == {"perplexity": before["perplexity"], "knowledge": before["knowledge"]}
    assert report["ppl_increase"] == pytest.approx(after["perplexity"] / before["perplexity"] - 1)
    ppl = report["ppl_increase_interval"]
    assert ppl["mean"] == pytest.approx(report["ppl_increase"]) and ppl["n"] == len(TEXTS)
    assert ppl["low"] < ppl["mean"] < ppl["high"] and ppl["method"] in ("bca", "percentile")
    k_before, k_after = report["knowledge_before"], report["knowledge_after"]
    assert k_before["method"] == k_after["method"] == "wilson" and k_before["n"] == 40
    assert k_before["mean"] == pytest.approx(before["knowledge"]) and k_before["low"] <= k_before["mean"]
    drop = report["knowledge_drop_interval"]
    assert drop["mean"] == pytest.approx(report["knowledge_drop"]) and drop["method"] == "newcombe-paired"
    assert drop["low"] <= drop["mean"] <= drop["high"]
    assert report["knowledge_comparison"]["test"] == "mcnemar exact"
    assert 0 < report["knowledge_comparison"]["p_value"] <= 1
    figures = forgetting_figures(typed)
    [gate] = check_gates(["forgetting.ppl_increase <= 1000 confidently"], figures)
    assert gate.on_bound and gate.high == pytest.approx(ppl["high"])


def test_the_same_weights_before_and_after_show_no_change_with_certainty(tiny_model):
    model, tokenizer = tiny_model
    questions = _short_questions(16)
    measured = measure(model, tokenizer, TEXTS, questions)
    report = forgetting_report(measured, measured, len(TEXTS), len(questions), "tiny").to_json()
    interval = report["ppl_increase_interval"]
    assert report["ppl_increase"] == 0 and interval["low"] == 0 == interval["high"]
    assert report["knowledge_comparison"]["p_value"] == 1.0 and report["knowledge_drop"] == 0


def test_summary_only_measurements_still_give_the_old_report():
    typed = forgetting_report({"perplexity": 10.0, "knowledge": 0.3}, {"perplexity": 11.0, "knowledge": 0.25},
                              300, 57, "bundled")
    report = typed.to_json()
    assert report["ppl_increase"] == pytest.approx(0.1) and report["knowledge_drop"] == pytest.approx(0.05)
    assert "ppl_increase_interval" not in report and "knowledge_comparison" not in report
    assert set(forgetting_figures(typed)) == {"forgetting.ppl_increase", "forgetting.knowledge_drop"}


def test_measure_forgetting_switches_the_adapter_off_for_the_base_and_follows_the_config(tiny_model, tmp_path,
                                                                                         capsys, monkeypatch):
    import threading
    from contextlib import nullcontext
    from types import SimpleNamespace

    from peft import LoraConfig, get_peft_model

    from specialist.config import validate_config
    from specialist.evaluate.forgetting import measure_forgetting

    model, tokenizer = tiny_model
    from specialist.evaluate.forgetting import bf16_autocast_helps

    autocast = bf16_autocast_helps(model)  # the stage runs in bf16 where the CPU multiplies it: compare alike
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        plain = perplexity(model, tokenizer, TEXTS)
    # Random (not zero) LoRA weights, so the adapter changes the model's answers.
    tuned = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lock = threading.Lock()  # both arms share one model, as the evaluation's engines do
    base_engine = SimpleNamespace(model=tuned, tokenizer=tokenizer, lock=lock, context=tuned.disable_adapter)
    tuned_engine = SimpleNamespace(model=tuned, tokenizer=tokenizer, lock=lock, context=nullcontext)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TEXTS) + "\n")
    probe = tmp_path / "probe.jsonl"
    probe.write_text("".join(json.dumps(q) + "\n" for q in _short_questions(12)))
    evaluation = validate_config({"data": {"path": "d.jsonl"}, "evaluation": {
        "forgetting_corpus": str(corpus), "knowledge_probe": str(probe), "knowledge_probe_size": 10,
        "bootstrap_samples": 200}}).evaluation
    from specialist.console import console

    monkeypatch.setattr(console, "width", 300)  # one progress line, one line
    typed = measure_forgetting(base_engine, tuned_engine, evaluation)
    report = typed.to_json()
    logged = " ".join(capsys.readouterr().err.split())  # a log file gets a progress line per stage and weights
    for stage, rows in (("perplexity", len(TEXTS)), ("knowledge probe", 10)):
        for weights in ("base", "tuned"):
            assert f"forgetting: {stage} ({weights} weights): {rows}/{rows} rows" in logged
    assert report["before"]["perplexity"] == pytest.approx(plain, rel=1e-6)  # the adapter was off
    assert report["after"]["perplexity"] != pytest.approx(plain, rel=1e-6)
    assert (report["texts"], report["questions"], report["corpus"]) == (len(TEXTS), 10, str(corpus))
    assert report["knowledge_before"]["n"] == 10 and not lock.locked()
    figure, before, after, change = typed.table()[0]
    assert report["precision"] == ("bfloat16 autocast" if autocast else "float32")
    precision = ", bfloat16 autocast" if autocast else ""
    assert figure == f"perplexity on {corpus} ({len(TEXTS)} texts{precision})" and before == f"{plain:.2f}"
    assert change.startswith(f"{100 * report['ppl_increase']:+.1f}% [")
    knowledge = typed.table()[1]
    assert knowledge[0] == "knowledge probe accuracy (10 questions)" and "McNemar p = " in knowledge[3]
    assert json.loads(json.dumps(report)) == report  # eval.json holds it as it is
    assert set(typed.figures()) == {"forgetting.ppl_increase", "forgetting.knowledge_drop"}
