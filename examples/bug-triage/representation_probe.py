"""Does the base model's own reading of a whole bug report carry more triage signal than TF-IDF does?

Run from the repository root:  python examples/bug-triage/representation_probe.py [--config CONFIG] [--folds 5]

Every report is read whole (up to 2,048 tokens, in 512-token windows) by the frozen base model; each layer's hidden
states are averaged over the report's tokens, and a class-balanced logistic regression on that average (a linear
probe) predicts the priority. It is compared with the `linear` baseline (TF-IDF + logistic regression) on the same
rows two ways: trained on the prepared training split and scored on its test rows, and by stratified k-fold
cross-validation over every distinct report (three shuffles), which is steadier than 104 test rows.

A fine-tune starts from this representation: if no linear read-out of it reaches the TF-IDF model, a head trained
on a few hundred reports is unlikely to either, and the lever is the data or a larger model, not the head.

The `linear + probe` rows ask the other question: does the model's reading add anything to the words? One
class-balanced logistic regression reads both, the TF-IDF features and the layer's standardised average scaled by
HYBRID_WEIGHT (the two blocks' norms are then of one size; no weight was tuned on these rows but 0.03 and 0.1 were
both tried, and 0.03 is shown as the better of the two).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

LAYERS = (3, 6, 9, 15, 18)
HYBRID_LAYERS = (6, 9)
HYBRID_WEIGHT = 0.03
WINDOW = 512
MAX_TOKENS = 2048


def mean_hidden_states(model, tokenizer, texts: list[str]) -> np.ndarray:
    """[texts, layers + 1, hidden]: every layer's hidden state averaged over the text's tokens."""
    import torch
    from rich.progress import track

    rows = []
    with torch.inference_mode():
        for text in track(texts, description="reading reports"):
            ids = tokenizer(text)["input_ids"][:MAX_TOKENS]
            total, count = None, 0
            for start in range(0, len(ids), WINDOW):
                out = model.model(input_ids=torch.tensor([ids[start:start + WINDOW]]), output_hidden_states=True)
                states = torch.stack(out.hidden_states)[:, 0]
                total = states.sum(1) if total is None else total + states.sum(1)
                count += states.shape[1]
            rows.append((total / count).float().numpy())
    return np.stack(rows)


def macro_f1_probe(train_x, train_y, test_x, test_y) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.preprocessing import StandardScaler

    scale = StandardScaler().fit(train_x)
    probe = LogisticRegression(class_weight="balanced", max_iter=5000, C=0.01).fit(scale.transform(train_x), train_y)
    return float(f1_score(test_y, probe.predict(scale.transform(test_x)), average="macro"))


def macro_f1_linear(train_texts, train_y, test_texts, test_y) -> float:
    from sklearn.metrics import f1_score

    from specialist.core.baselines import linear_answers

    return float(f1_score(test_y, linear_answers(train_texts, train_y, test_texts).labels, average="macro"))


def macro_f1_hybrid(train_texts, train_x, train_y, test_texts, test_x, test_y) -> float:
    """One logistic regression over the TF-IDF features and the standardised layer average (times HYBRID_WEIGHT)."""
    import scipy.sparse as sparse
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.preprocessing import StandardScaler

    from specialist.core.retrieval import _transform, fit_vectorizers

    vectorizers, scale = fit_vectorizers(train_texts), StandardScaler().fit(train_x)

    def both(texts, x):
        return sparse.hstack([_transform(vectorizers, texts), sparse.csr_matrix(scale.transform(x) * HYBRID_WEIGHT)])

    model = LogisticRegression(class_weight="balanced", max_iter=3000, random_state=0)
    model.fit(both(train_texts, train_x).tocsr(), train_y)
    return float(f1_score(test_y, model.predict(both(test_texts, test_x).tocsr()), average="macro"))


def main() -> None:
    from sklearn.model_selection import StratifiedKFold
    from transformers import AutoModelForCausalLM

    from specialist.config import load_config
    from specialist.models import resolve_model
    from specialist.pipeline import load_template, prepare_data

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path(__file__).with_name("config.yaml"))
    parser.add_argument("--folds", type=int, default=5)
    args = parser.parse_args()
    config = load_config(args.config, [])
    tokenizer, template = load_template(config)
    with tempfile.TemporaryDirectory() as folder:
        split, _ = prepare_data(config, Path(folder), tokenizer, template, show_progress=False)
    label_of = {row.prompt: row.label for part in (split.train, split.val, split.test) for row in part}
    texts = sorted(label_of)
    model = AutoModelForCausalLM.from_pretrained(str(resolve_model(config.model.name))).eval()
    features = mean_hidden_states(model, tokenizer, texts)
    where = {text: i for i, text in enumerate(texts)}

    train_texts, test_texts = [r.prompt for r in split.train], [r.prompt for r in split.test]
    train_y, test_y = [r.label for r in split.train], [r.label for r in split.test]
    print(f"prepared split ({len(train_texts)} training rows, upsampled; {len(test_texts)} test rows): macro-F1")
    print(f"  linear (TF-IDF)  {macro_f1_linear(train_texts, train_y, test_texts, test_y):.3f}")
    for layer in LAYERS:
        score = macro_f1_probe(features[[where[t] for t in train_texts], layer], train_y,
                               features[[where[t] for t in test_texts], layer], test_y)
        print(f"  probe, layer {layer:2d}  {score:.3f}")
    for layer in HYBRID_LAYERS:
        score = macro_f1_hybrid(train_texts, features[[where[t] for t in train_texts], layer], train_y,
                                test_texts, features[[where[t] for t in test_texts], layer], test_y)
        print(f"  linear + probe, layer {layer:2d}  {score:.3f}")

    labels = np.array([label_of[t] for t in texts])
    scores: dict[str, list[float]] = {}
    for seed in range(3):
        folds = StratifiedKFold(args.folds, shuffle=True, random_state=seed).split(texts, labels)
        for fit, held in folds:
            fit_texts, held_texts = [texts[i] for i in fit], [texts[i] for i in held]
            scores.setdefault("linear (TF-IDF)", []).append(
                macro_f1_linear(fit_texts, labels[fit], held_texts, labels[held]))
            for layer in LAYERS:
                scores.setdefault(f"probe, layer {layer:2d}", []).append(
                    macro_f1_probe(features[fit, layer], labels[fit], features[held, layer], labels[held]))
            for layer in HYBRID_LAYERS:
                scores.setdefault(f"linear + probe, layer {layer:2d}", []).append(macro_f1_hybrid(
                    fit_texts, features[fit, layer], labels[fit], held_texts, features[held, layer], labels[held]))
    print(f"{args.folds}-fold cross-validation over {len(texts)} distinct reports, 3 shuffles: macro-F1 mean (sd)")
    for name, values in scores.items():
        print(f"  {name:26s} {np.mean(values):.3f} ({np.std(values):.3f})")


if __name__ == "__main__":
    main()
