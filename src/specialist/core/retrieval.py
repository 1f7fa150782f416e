"""The retrieval index: the training rows, searchable by how alike their inputs are.

One index serves three callers, so they can never disagree about what "the most similar training row" is:
the `nearest` baseline (copy that row's answer), the `retrieval` baseline (the base model prompted with the k
nearest rows), and retrieval-augmented fine-tuning (`data.retrieval`: each prompt carries its k nearest rows with
their answers, in training, evaluation and serving alike).

Similarity is the cosine of TF-IDF vectors over word 1-2 grams and character 2-5 grams (sublinear term
frequency), scikit-learn's vectorizers fitted on the training inputs. The index is stored as its rows (JSON, no
pickle) and refitted on load: fitting is deterministic and takes well under a second for a few thousand rows.

Leakage rule, the same everywhere: a query never retrieves a row whose input is a near duplicate of its own
(cosine >= `near_duplicate`, which covers the row itself and exact copies), nor, in training, a row of its own
group (`split_by: grouped` keeps a group out of the other splits, so training must not lean on it either).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from specialist.atomic import write_text_atomically

FORMAT_VERSION = 1
DEFAULT_NEAR_DUPLICATE = 0.95
CHUNK = 256  # queries scored at once: a dense [CHUNK, rows] block of similarities
_FIT_LOCK = threading.Lock()
Shots = list[tuple[str, str]]


@dataclass
class RetrievalIndex:
    """Training inputs and answers (with labels and groups where the rows have them), searchable by input."""

    inputs: list[str]
    answers: list[str]
    labels: list[str | None] = field(default_factory=list)
    groups: list[str | None] = field(default_factory=list)
    near_duplicate: float = DEFAULT_NEAR_DUPLICATE
    k: int = 3  # rows a retrieval-trained model's prompts carry
    _vectorizers: Any = field(default=None, repr=False, compare=False)
    _matrix: Any = field(default=None, repr=False, compare=False)
    _groups: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.inputs) != len(self.answers):
            raise ValueError(f"{len(self.inputs)} inputs but {len(self.answers)} answers")
        self.labels = list(self.labels) or [None] * len(self.inputs)
        self.groups = list(self.groups) or [None] * len(self.inputs)
        if not 0.0 < self.near_duplicate <= 1.0:
            raise ValueError(f"near_duplicate must be in (0, 1], got {self.near_duplicate}")
        if not isinstance(self.k, int) or not 1 <= self.k <= 32:
            raise ValueError(f"k must be an integer from 1 to 32, got {self.k!r}")

    @classmethod
    def of_examples(cls, examples: Sequence[Any], near_duplicate: float = DEFAULT_NEAR_DUPLICATE,
                    k: int = 3) -> RetrievalIndex:
        """From rows with .prompt, .completion and, where present, .label and .group (data.Example)."""
        return cls([ex.prompt for ex in examples], [ex.completion for ex in examples],
                   [getattr(ex, "label", None) for ex in examples], [getattr(ex, "group", None) for ex in examples],
                   near_duplicate, k)

    def __len__(self) -> int:
        return len(self.inputs)

    def similarities(self, queries: Sequence[str]):
        """[queries, rows] cosine similarities (a dense numpy array)."""
        import numpy as np

        if not self.inputs or not queries:
            return np.zeros((len(queries), len(self.inputs)))
        vectors = _transform(self._fitted(), queries)
        return (vectors @ self._matrix.T).toarray()

    def neighbours(self, queries: Sequence[str], k: int, groups: Sequence[str | None] | None = None,
                   exclude: Sequence[int | None] | None = None) -> list[list[int]]:
        """For each query, the indices of its k most similar rows, most similar first (ties: the earlier row).

        Near duplicates of the query are never returned; with `groups`, neither are rows of the query's own group;
        `exclude` names one row per query to leave out (a training row's own index). Queries are scored in chunks,
        so memory stays at CHUNK x rows whatever the number of queries."""
        found: list[list[int]] = []
        for start in range(0, len(queries), CHUNK):
            chunk = self.similarities(queries[start:start + CHUNK])
            for offset, row in enumerate(chunk):
                q = start + offset
                self._mask(row, None if groups is None else groups[q], None if exclude is None else exclude[q])
                found.append(_top_k(row, k))
        return found

    def _mask(self, row, group: str | None, exclude: int | None) -> None:
        """Set the similarity of every row the query may not retrieve to -inf (in place)."""
        import numpy as np

        row[row >= self.near_duplicate - 1e-9] = -np.inf
        if group is not None:
            row[self._group_array() == group] = -np.inf
        if exclude is not None:
            row[exclude] = -np.inf

    def _group_array(self):
        import numpy as np

        if self._groups is None:
            self._groups = np.array(self.groups, dtype=object)
        return self._groups

    def shots(self, queries: Sequence[str], k: int, groups: Sequence[str | None] | None = None,
              exclude: Sequence[int | None] | None = None) -> list[Shots]:
        """Each query's k nearest rows as (input, answer) pairs, the least similar first so that the most similar
        example sits next to the query in the prompt."""
        return [[(self.inputs[i], self.answers[i]) for i in reversed(found)]
                for found in self.neighbours(queries, k, groups, exclude)]

    def prompt_shots(self, queries: Sequence[str]) -> list[Shots]:
        """What a model trained with this index is shown before each query: its `k` nearest rows (evaluation and
        serving alike)."""
        return self.shots(queries, self.k)

    def training_shots(self, k: int, use_groups: bool) -> list[Shots]:
        """Each indexed row's own shots, as training shows them: never itself, a near duplicate, or (with
        `use_groups`) a row of its group."""
        return self.shots(self.inputs, k, self.groups if use_groups else None, list(range(len(self.inputs))))

    def nearest_answers(self, queries: Sequence[str]) -> list[str]:
        """The answer of each query's most similar row (the `nearest` baseline); "" when the index is empty."""
        return [self.answers[found[0]] if found else "" for found in self.neighbours(queries, 1)]

    def _fitted(self):
        with _FIT_LOCK:  # serve encodes prompts on worker threads: the first requests must not fit it twice
            if self._vectorizers is None:
                vectorizers = fit_vectorizers(self.inputs)
                self._matrix = _transform(vectorizers, self.inputs)
                self._vectorizers = vectorizers
        return self._vectorizers

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT_VERSION, "near_duplicate": self.near_duplicate, "k": self.k,
                "rows": [{"input": i, "answer": a, "label": lab, "group": g}
                         for i, a, lab, g in zip(self.inputs, self.answers, self.labels, self.groups)]}

    def save(self, path: Path) -> None:
        """Write beside `path` and rename into place: a kill mid-write leaves no half index for a run to load."""
        write_text_atomically(path, json.dumps(self.to_json(), ensure_ascii=False))

    @classmethod
    def load(cls, path: Path) -> RetrievalIndex:
        """An index written by save(); ValueError naming the file when it is not one."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            if data.get("format") != FORMAT_VERSION:
                raise ValueError(f"format {data.get('format')!r}, expected {FORMAT_VERSION}")
            rows = data["rows"]
            return cls([str(r["input"]) for r in rows], [str(r["answer"]) for r in rows],
                       [r.get("label") for r in rows], [r.get("group") for r in rows],
                       float(data.get("near_duplicate", DEFAULT_NEAR_DUPLICATE)), data.get("k", 3))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{path}: not a retrieval index ({exc})") from exc


def _top_k(row, k: int) -> list[int]:
    """Indices of the k highest finite values, highest first, ties broken by the lower index."""
    import numpy as np

    allowed = np.flatnonzero(np.isfinite(row))
    if k <= 0 or allowed.size == 0:
        return []
    values = row[allowed]
    if allowed.size > k:
        kth = np.partition(values, allowed.size - k)[allowed.size - k]
        keep = values >= kth
        allowed, values = allowed[keep], values[keep]
    order = np.lexsort((allowed, -values))
    return [int(i) for i in allowed[order][:k]]


def fit_vectorizers(texts: Sequence[str]):
    """Word 1-2 gram and character 2-5 gram TF-IDF vectorizers fitted on `texts` (the linear baseline reads the
    same features)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    word = TfidfVectorizer(analyzer="word", ngram_range=(1, 2), sublinear_tf=True, token_pattern=r"(?u)\b\w+\b")
    char = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True)
    fitted = []
    for vectorizer in (word, char):
        try:
            vectorizer.fit(texts)
            fitted.append(vectorizer)
        except ValueError:  # no word (or character) at all in any text: that view adds nothing
            continue
    return fitted


def _transform(vectorizers, texts: Sequence[str]):
    """Both views side by side, each row scaled to unit length (so a dot product is the cosine)."""
    from scipy.sparse import csr_matrix, hstack
    from sklearn.preprocessing import normalize

    if not vectorizers:
        return csr_matrix((len(texts), 1))
    return normalize(hstack([v.transform(texts) for v in vectorizers]).tocsr())
