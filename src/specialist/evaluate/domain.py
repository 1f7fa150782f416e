"""Evaluation of continued pretraining (domain adaptation): what the model now knows of the domain, and what
it kept of everything else.

Plain text has no prompts to answer, so instead of base / few-shot / tuned generations this scores two arms,
`base` (the adapter switched off, or the base weights) and `tuned`, on:

- perplexity on the run's held-out documents (test split): the gain on the domain;
- perplexity on general text (the bundled Wikipedia sentences or `evaluation.forgetting_corpus`): the cost;
- `evaluation.questions`, when given: multiple-choice questions about the documents, each answered by the
  choice with the highest mean log-probability per token after the question (how lm-evaluation-harness
  scores small models, which cannot be trusted to write an answer letter), with a bootstrap interval and a
  paired test between the arms.

Figures for gates: `base.doc_perplexity`, `tuned.doc_perplexity`, `*.general_perplexity`,
`*.question_accuracy`, `domain.doc_ppl_change` (relative: -0.2 is 20% lower) and `forgetting.ppl_increase`.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import torch

from specialist.config import RunConfig
from specialist.console import console
from specialist.core.gates import check_gates
from specialist.core.stats import paired_comparison, score_interval
from specialist.errors import DataError
from specialist.evaluate.forgetting import general_text, perplexity
from specialist.evaluate.results import DomainArm, DomainReport
from specialist.run_folder import RunFolder
from specialist.trackers import log_evaluation


def read_questions(path: Path) -> list[dict[str, Any]]:
    """JSONL rows {"question": str, "choices": [str, ...], "answer": index or the choice itself}, and optionally
    "document": the start of the document that answers it (to report questions on trained documents apart)."""
    if not path.is_file():
        raise DataError(f"evaluation.questions: {path} is not a file", hint="give a JSONL file of questions")
    questions = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            choices = [str(c) for c in row["choices"]]
            answer = row["answer"] if isinstance(row["answer"], int) else choices.index(str(row["answer"]))
            if not row["question"] or len(choices) < 2 or not 0 <= answer < len(choices):
                raise ValueError("needs a question, two or more choices and an answer among them")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{path}:{number}: not a question row ({exc})",
                            hint='write {"question": "...", "choices": ["a", "b", ...], "answer": 0}') from exc
        questions.append({"question": row["question"], "choices": choices, "answer": answer,
                          "document": row.get("document")})
    if not questions:
        raise DataError(f"{path} holds no questions")
    return questions


@torch.inference_mode()
def choice_scores(model, tokenizer, question: str, choices: list[str]) -> list[float]:
    """Mean log-probability per token of each choice written after `Question: ...\\nAnswer:`."""
    prefix = f"Question: {question}\nAnswer:"
    prefix_ids = tokenizer(prefix)["input_ids"]
    rows = [prefix_ids + tokenizer(" " + c, add_special_tokens=False)["input_ids"] for c in choices]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=model.device)
    attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=model.device)
    logits = model(input_ids=input_ids, attention_mask=attention).logits.float()
    scores = []
    for i, row in enumerate(rows):
        positions = torch.arange(len(prefix_ids) - 1, len(row) - 1, device=model.device)
        targets = input_ids[i, len(prefix_ids) : len(row)]
        logprobs = torch.log_softmax(logits[i, positions], dim=-1).gather(1, targets[:, None])
        scores.append(float(logprobs.mean()))
    return scores


def answer_questions(model, tokenizer, questions: list[dict[str, Any]]) -> list[float]:
    """1 per question whose right choice scores highest, else 0."""
    model.eval()
    correct = []
    for q in questions:
        scores = choice_scores(model, tokenizer, q["question"], q["choices"])
        correct.append(float(max(range(len(scores)), key=scores.__getitem__) == q["answer"]))
    return correct


def measure_arm(model, tokenizer, docs: list[str], general: list[str],
                questions: list[dict[str, Any]]) -> dict[str, Any]:
    model.eval()
    return {"doc_perplexity": perplexity(model, tokenizer, docs, batch_size=4),
            "general_perplexity": perplexity(model, tokenizer, general),
            "questions": answer_questions(model, tokenizer, questions) if questions else []}


def evaluate_domain(run: RunFolder, config: RunConfig, others: dict[str, Path] | None = None) -> DomainReport:
    """Score base, tuned (and any other run: `specialist compare`) on held-out documents, general text and the
    question set; write eval.json, report.md and report.html; check the gates."""
    from specialist.artifacts import ModelPool, load_run

    evaluation = config.evaluation
    split = run.split()
    docs = [ex.completion for ex in split.test[: evaluation.max_examples or None]]
    if not docs:
        raise DataError(f"{run.data} has no held-out documents", hint="set data.test_fraction above 0")
    general = general_text(evaluation.forgetting_corpus, evaluation.forgetting_max_texts)
    questions = read_questions(evaluation.questions) if evaluation.questions else []
    pool = ModelPool(config.model.dtype)
    tuned = load_run(run, pool, adapter_name="tuned")
    base_model, tokenizer = pool.base(config.model.name)
    console.log(f"domain evaluation: {len(docs)} held-out documents, {len(general)} general texts, "
                f"{len(questions)} questions")
    with pool.base_context(config.model.name)():
        before = measure_arm(base_model, tokenizer, docs, general, questions)
    measured = {"base": before}
    for name, loaded in [("tuned", tuned)] + [(n, load_run(RunFolder.open(Path(p)), pool, adapter_name=n))
                                              for n, p in (others or {}).items()]:
        with loaded.context():
            measured[name] = measure_arm(loaded.model, tokenizer, docs, general, questions)
    trained_on = [trained_document(q, split.train) for q in questions]
    report = domain_report(run.path, measured, len(docs), len(general), evaluation, trained_on)
    report.gates = check_gates(evaluation.gates, domain_figures(report), evaluation)
    write_domain_outputs(run, report)
    log_evaluation(run, config.training.report_to, report.to_json())  # the trackers training reported to
    return report


def trained_document(question: dict[str, Any], train) -> bool | None:
    """Whether the document answering `question` was in the training split (None: the question does not say)."""
    if not question.get("document"):
        return None
    return any(ex.completion.startswith(question["document"]) for ex in train)


def _subset_accuracy(correct: list[float], keep: list[bool]) -> float | None:
    chosen = [c for c, k in zip(correct, keep) if k]
    return sum(chosen) / len(chosen) if chosen else None


def domain_report(run_dir: Path, measured: dict[str, dict[str, Any]], n_docs: int, n_general: int,
                  evaluation, trained_on: list[bool | None] | None = None) -> DomainReport:
    """`measured` holds each arm's figures: "base", "tuned", then any other run compared."""
    before, after = measured["base"], measured["tuned"]
    arms = {name: DomainArm(figures["doc_perplexity"], figures["general_perplexity"],
                            score_interval(figures["questions"], evaluation.bootstrap_samples)
                            if figures["questions"] else None)
            for name, figures in measured.items()}
    report = DomainReport(
        run_dir=run_dir, n_eval=n_docs, general_texts=n_general,
        general_corpus=str(evaluation.forgetting_corpus or "bundled Wikipedia sentences"),
        questions=len(before["questions"]), arms=arms,
        doc_ppl_change=after["doc_perplexity"] / before["doc_perplexity"] - 1,
        general_ppl_change=after["general_perplexity"] / before["general_perplexity"] - 1)
    if before["questions"]:
        report.question_comparison = paired_comparison(before["questions"], after["questions"],
                                                       evaluation.bootstrap_samples)
        report.question_subsets = question_subsets({n: f["questions"] for n, f in measured.items()}, trained_on)
    return report


def question_subsets(correct: dict[str, list[float]],
                     trained_on: list[bool | None] | None) -> dict[str, dict[str, Any]]:
    """Each arm's accuracy on questions about trained documents and about held-out ones, apart."""
    trained_on = trained_on or [None] * len(correct["base"])
    subsets = {}
    for subset, keep in (("trained", [t is True for t in trained_on]), ("held_out", [t is False for t in trained_on])):
        if any(keep):
            subsets[subset] = {"n": sum(keep), **{arm: _subset_accuracy(values, keep) for arm, values in correct.items()}}
    return subsets


def domain_figures(report: DomainReport):
    from specialist.core.gates import Figure, Figures

    figures = {"domain.doc_ppl_change": Figure(report.doc_ppl_change),
               "forgetting.ppl_increase": Figure(report.general_ppl_change)}
    for name, arm in report.arms.items():
        figures[f"{name}.doc_perplexity"] = Figure(arm.doc_perplexity)
        figures[f"{name}.general_perplexity"] = Figure(arm.general_perplexity)
        if arm.question_accuracy is not None:
            figures[f"{name}.question_accuracy"] = Figure.of(arm.question_accuracy)
    differences = {}
    if report.question_comparison is not None:
        differences[("tuned", "base", "question_accuracy")] = report.question_comparison.difference
    return Figures(figures, differences)


def domain_table(report: DomainReport) -> list[tuple[str, ...]]:
    """(metric, one value per arm, tuned minus base) rows, as the CLI, report.md and report.html show them."""
    arms = list(report.arms)
    rows = [
        (f"perplexity on {report.n_eval} held-out documents", *[f"{report.arms[a].doc_perplexity:.2f}" for a in arms],
         f"{100 * report.doc_ppl_change:+.1f}%"),
        (f"perplexity on {report.general_texts} general texts",
         *[f"{report.arms[a].general_perplexity:.2f}" for a in arms], f"{100 * report.general_ppl_change:+.1f}%"),
    ]
    if report.question_comparison is not None:
        b, t = report.arms["base"].question_accuracy, report.arms["tuned"].question_accuracy
        rows.append((f"accuracy on {report.questions} questions about the documents",
                     *[report.arms[a].question_accuracy.format(".1f", 100, "%") for a in arms],
                     f"{100 * (t.mean - b.mean):+.1f} pts (p={report.question_comparison.p_value:.3f})"))
        for subset, words in (("trained", "trained on"), ("held_out", "held out")):
            if part := report.question_subsets.get(subset):
                rows.append((f"  of which {part['n']} on documents {words}",
                             *[f"{100 * part[a]:.1f}%" for a in arms],
                             f"{100 * (part['tuned'] - part['base']):+.1f} pts"))
    return rows


def domain_columns(report: DomainReport) -> list[str]:
    return ["metric", *report.arms, "tuned - base"]


def write_domain_outputs(run: RunFolder, report: DomainReport) -> None:
    run.eval_json.write_text(json.dumps(report.to_json(), indent=2), encoding="utf-8")
    rows = domain_table(report)
    gates = [f"- {g.describe()}" for g in report.gates]
    columns = domain_columns(report)
    markdown = ["# Domain adaptation: before and after", "", f"| {' | '.join(columns)} |",
                "|" + "---|" * len(columns),
                *[f"| {' | '.join(row)} |" for row in rows], "", "## Gates", "", *(gates or ["(none)"]), ""]
    run.report_md.write_text("\n".join(markdown), encoding="utf-8")
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    gate_items = "".join(f"<li>{html.escape(g[2:])}</li>" for g in gates)
    run.report_html.write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>Domain adaptation</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{border:1px solid #ccc;padding:4px 8px}"
        "table{border-collapse:collapse}</style></head><body><h1>Domain adaptation: before and after</h1>"
        f"<table><tr>{''.join(f'<th>{html.escape(c)}</th>' for c in columns)}</tr>{cells}</table>"
        f"<h2>Gates</h2><ul>{gate_items or '<li>(none)</li>'}</ul></body></html>", encoding="utf-8")
    console.log(f"evaluation written to {run.eval_json}")
