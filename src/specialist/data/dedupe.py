"""Exact and near-duplicate detection that scales to millions of rows without keeping their text.

Exact: a 64-bit xxhash of the case- and space-folded text; the first row of each key is kept.
Near: MinHash signatures over word shingles, computed for a whole batch of rows at once in numpy, then
locality-sensitive hashing (bands of the signature) proposes candidate pairs and the signature agreement
(an estimate of Jaccard similarity) confirms them. Only the signatures (num_perm x 4 bytes a row) are kept.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import xxhash

_WORD = re.compile(r"\w+")
_MERSENNE_SHIFT = np.uint64(32)


def fold(text: str) -> str:
    return " ".join(text.casefold().split())


def exact_key(*fields: str | None) -> int:
    return xxhash.xxh64_intdigest("\x1f".join(fold(f) for f in fields if f is not None).encode())


def lsh_bands(num_perm: int, threshold: float) -> tuple[int, int]:
    """(bands, rows per band) for `num_perm`: the split whose S-curve midpoint lies just below `threshold`.

    Candidates are confirmed against the threshold afterwards, so erring low loses nothing but time.
    """
    options = [(num_perm // r, r) for r in range(1, num_perm + 1) if num_perm % r == 0]
    below = [(b, r) for b, r in options if (1 / b) ** (1 / r) <= threshold - 0.05]
    return max(below, key=lambda br: br[1]) if below else options[-1]


@dataclass
class MinHasher:
    num_perm: int = 64
    shingle_words: int = 3
    seed: int = 1

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        # multiply-shift hashing mod 2**64: a must be odd; numpy wraps uint64 products, which is the point
        self._a = (rng.integers(1, 2**63, size=self.num_perm, dtype=np.uint64) << np.uint64(1)) | np.uint64(1)
        self._b = rng.integers(0, 2**63, size=self.num_perm, dtype=np.uint64)

    def shingles(self, text: str) -> list[int]:
        words = _WORD.findall(text.casefold())
        n = self.shingle_words
        if len(words) <= n:
            return [xxhash.xxh64_intdigest(" ".join(words).encode())]
        return [xxhash.xxh64_intdigest(" ".join(words[i : i + n]).encode()) for i in range(len(words) - n + 1)]

    def signatures(self, texts: list[str]) -> np.ndarray:
        """(len(texts), num_perm) uint32 MinHash signatures, one vectorised pass for the batch."""
        per_text = [self.shingles(t) for t in texts]
        lengths = np.fromiter((len(s) for s in per_text), dtype=np.int64, count=len(per_text))
        flat = np.fromiter((h for s in per_text for h in s), dtype=np.uint64, count=int(lengths.sum()))
        starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        out = np.empty((len(texts), self.num_perm), dtype=np.uint32)
        for j in range(self.num_perm):  # one permutation at a time keeps the working set at len(flat) words
            permuted = (flat * self._a[j] + self._b[j]) >> _MERSENNE_SHIFT
            out[:, j] = np.minimum.reduceat(permuted, starts)
        return out


def band_key(signatures: np.ndarray, band: int, rows: int) -> np.ndarray:
    """(n,) uint64: one hash of band `band` of each signature; equal keys are LSH candidates.

    One band at a time, so the working set is n x rows words rather than the whole signature matrix widened.
    """
    key = np.zeros(signatures.shape[0], dtype=np.uint64)
    for column in range(band * rows, (band + 1) * rows):
        key = key * np.uint64(1_000_003) + signatures[:, column].astype(np.uint64)
    return key


def similarity(signatures: np.ndarray, i: np.ndarray | int, j: np.ndarray | int) -> np.ndarray:
    return (signatures[i] == signatures[j]).mean(axis=-1)


def confirmed_pairs(signatures: np.ndarray, left: np.ndarray, right: np.ndarray, threshold: float,
                    chunk: int = 65_536) -> np.ndarray:
    """Mask of the (left, right) pairs whose signatures agree on at least `threshold` of positions."""
    keep = np.zeros(left.size, dtype=bool)
    for start in range(0, left.size, chunk):
        part = slice(start, start + chunk)
        keep[part] = similarity(signatures, left[part], right[part]) >= threshold
    return keep


class UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = int(self.parent[root])
        while self.parent[i] != root:
            self.parent[i], i = root, int(self.parent[i])
        return root

    def union(self, i: int, j: int) -> None:
        ri, rj = self.find(i), self.find(j)
        if ri != rj:  # the lower index becomes the root, so a cluster is named by its first row
            self.parent[max(ri, rj)] = min(ri, rj)


def near_duplicate_roots(signatures: np.ndarray, threshold: float, active: np.ndarray | None = None,
                         groups: np.ndarray | None = None) -> np.ndarray:
    """For each row, the index of the first row of its near-duplicate cluster (itself when unique).

    `active` (bool mask) limits the search to those rows; the others map to themselves. With `groups` (one
    integer a row) only rows of the same group can join a cluster.
    """
    n, num_perm = signatures.shape
    bands, rows = lsh_bands(num_perm, threshold)
    index = np.flatnonzero(active) if active is not None else np.arange(n)
    subset = signatures[index]
    salt = None if groups is None else groups[index].astype(np.int64).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    union = UnionFind(n)
    for band in range(bands):
        keys = band_key(subset, band, rows)
        if salt is not None:  # rows of different groups fall into different buckets
            keys = keys ^ salt
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        starts_run = np.concatenate(([True], sorted_keys[1:] != sorted_keys[:-1]))
        first_of_run = order[np.flatnonzero(starts_run)][np.cumsum(starts_run) - 1]
        candidates = np.flatnonzero(first_of_run != order)
        if candidates.size == 0:
            continue
        left, right = index[first_of_run[candidates]], index[order[candidates]]
        confirmed = confirmed_pairs(signatures, left, right, threshold)
        if groups is not None:
            confirmed &= groups[left] == groups[right]
        for i, j in zip(left[confirmed].tolist(), right[confirmed].tolist(), strict=True):
            union.union(i, j)
    return np.fromiter((union.find(i) for i in range(n)), dtype=np.int64, count=n)


def leaking_rows(signatures: np.ndarray, threshold: float, reference: np.ndarray, probe: np.ndarray) -> np.ndarray:
    """Indices in `probe` that are near-duplicates (>= threshold) of some row in `reference`."""
    if reference.size == 0 or probe.size == 0:
        return np.empty(0, dtype=np.int64)
    bands, rows = lsh_bands(signatures.shape[1], threshold)
    ref_signatures, probe_signatures = signatures[reference], signatures[probe]
    leaked = np.zeros(probe.size, dtype=bool)
    for band in range(bands):
        ref_keys, probe_keys = band_key(ref_signatures, band, rows), band_key(probe_signatures, band, rows)
        order = np.argsort(ref_keys, kind="stable")
        sorted_keys = ref_keys[order]
        low = np.searchsorted(sorted_keys, probe_keys, side="left")
        high = np.searchsorted(sorted_keys, probe_keys, side="right")
        for p in np.flatnonzero((~leaked) & (high > low)).tolist():  # every reference row in the bucket
            refs = reference[order[low[p] : high[p]]]
            if (similarity(signatures, refs, probe[p]) >= threshold).any():
                leaked[p] = True
    return probe[leaked]
