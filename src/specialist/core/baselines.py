"""The cheapest honest alternatives to a fine-tune, answered on the same held-out rows as every other arm.

- `nearest`: the answer of the most similar training input (core.retrieval's index).
- `majority`: the most frequent training label (label tasks only).
- `linear`: TF-IDF (the index's word and character n-grams) + logistic regression, class-balanced, fitted on the
  training split (label tasks only).

None of them ever reads a held-out answer: each is fitted on training rows and then asked the held-out inputs.
A fifth baseline, `retrieval` (the base model prompted with the k nearest training rows), needs a model and is
built by evaluation from the same index.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from specialist.core.retrieval import RetrievalIndex, _transform, fit_vectorizers

@dataclass
class LabelAnswers:
    """A label baseline's answers: the label per query and, where the baseline has them, class probabilities
    ([queries, labels] in the order of `classes`)."""

    labels: list[str]
    classes: list[str]
    probabilities: Any = None


def training_labels(index: RetrievalIndex) -> list[str] | None:
    """The training rows' labels when every row has one and there are at least two classes; else None (the label
    baselines do not apply)."""
    if not index.labels or any(label is None for label in index.labels):
        return None
    labels = [str(label) for label in index.labels]
    return labels if len(set(labels)) >= 2 else None


def majority_answers(train_labels: Sequence[str], n: int) -> LabelAnswers:
    """The most frequent training label for every query (ties: the label seen first)."""
    counts = Counter(train_labels)
    top = max(counts, key=lambda label: (counts[label], -train_labels.index(label)))
    return LabelAnswers([top] * n, sorted(counts))


def linear_answers(train_inputs: Sequence[str], train_labels: Sequence[str], queries: Sequence[str],
                   seed: int = 0) -> LabelAnswers:
    """Logistic regression (class-balanced, scikit-learn's defaults otherwise) on TF-IDF word 1-2 and character
    2-5 grams fitted on the training inputs only; the most probable class per query, with the probabilities."""
    from sklearn.linear_model import LogisticRegression

    vectorizers = fit_vectorizers(train_inputs)
    model = LogisticRegression(class_weight="balanced", max_iter=2000, random_state=seed)
    model.fit(_transform(vectorizers, train_inputs), list(train_labels))
    probabilities = model.predict_proba(_transform(vectorizers, queries))
    classes = [str(c) for c in model.classes_]
    return LabelAnswers([classes[i] for i in probabilities.argmax(axis=1)], classes, probabilities)


LOOKUP_WARNING = 0.5  # above this share of held-out rows answered by lookup, the test set measures recall
LOOKUP_ROWS = 500  # held-out rows the check reads at most per split (the first ones: the split is shuffled)
LOOKUP_INDEX_ROWS = 5000  # training rows the nearest rule searches at most, so prepare stays fast on big data
LOOKUP_MAX_TRAIN = 10_000  # above this many training rows prepare skips the check (`specialist baselines` runs it)


def lookup_check(train: Sequence[Any], held_out: dict[str, Sequence[Any]],
                 seen_in_train: Callable[[str], bool] | None = None) -> dict[str, Any]:
    """How much of each held-out split a lookup answers: the share of rows whose answer appears verbatim among the
    training answers, and the share the `nearest` rule answers exactly right. Rows are data.Examples (prompt,
    completion, label). `warn` is set for free-text answers when either share reaches LOOKUP_WARNING: such a
    test set measures recall of seen answers, not the skill. `seen_in_train(answer)` says whether a stripped answer
    is among all the training answers, where `train` is only the first of them (prepare, on big data)."""
    labelled = bool(train) and all(getattr(ex, "label", None) is not None for ex in train)
    index = RetrievalIndex.of_examples(list(train)[:LOOKUP_INDEX_ROWS])
    if seen_in_train is None:
        seen_in_train = {ex.completion.strip() for ex in train}.__contains__
    report: dict[str, Any] = {"labelled": labelled, "threshold": LOOKUP_WARNING, "indexed_train_rows": len(index),
                              "splits": {}}
    for name, rows in held_out.items():
        rows = list(rows)[:LOOKUP_ROWS]
        if not rows or not train:
            continue
        answers = index.nearest_answers([ex.prompt for ex in rows])
        report["splits"][name] = {
            "rows": len(rows),
            "answer_seen_in_train": sum(seen_in_train(ex.completion.strip()) for ex in rows) / len(rows),
            "nearest_exact": sum(a.strip() == ex.completion.strip() for a, ex in zip(answers, rows)) / len(rows)}
    report["warn"] = not labelled and any(
        max(s["answer_seen_in_train"], s["nearest_exact"]) >= LOOKUP_WARNING for s in report["splits"].values())
    return report
