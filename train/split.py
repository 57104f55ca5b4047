"""A leakage-aware, deterministic split of BUSI into a held-out test portion and five cross-validation folds.

BUSI has no patient identifiers and contains many near-duplicate frames (the same scan cropped or scaled
differently). A random image-level split would put one copy in training and its twin in test and inflate every
test metric. So images are first grouped, and groups are never divided:

* groups are the connected components (union-find) of "looks like the same picture" pairs: the dataset's own
  ``near_duplicate_candidates.csv`` plus a fresh perceptual-hash screen run here (64-bit dHash Hamming distance
  and Pearson correlation of 64x64 greyscale thumbnails), which catches pairs the shipped list missed;
* the byte-identical pair ``benign/benign (433).png`` == ``malignant/malignant (145).png`` carries two different
  labels for one picture; no label can be trusted, so both files are ``excluded`` from training, validation and
  test alike (their group's other members are split normally, as one group);
* ``StratifiedGroupKFold(5, shuffle=True, random_state=SEED)`` over all groups; fold 0 is the test portion
  (about 20%, class-stratified); the rest is split again with ``StratifiedGroupKFold(5)`` into folds "0".."4".

    python -m train.split --data ../shared/data/busi --out train/splits/busi_v1.csv
"""

from __future__ import annotations

import argparse
import hashlib
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from busi_batch.discover import ImageItem, discover
from busi_batch.imageio import load_image
from busi_batch.preprocess import to_gray_float

SEED = 20240611
#: Perceptual screen: a pair is the same picture when the dHash differs in at most this many of 64 bits ...
DHASH_MAX_HAMMING = 4
#: ... or when the 64x64 thumbnails correlate at least this much (the shipped screen used 2 and 0.95).
MIN_CORRELATION = 0.95
EXCLUDED_IDENTICAL = ("benign/benign (433).png", "malignant/malignant (145).png")
TEST = "test"
EXCLUDED = "excluded"


# ----------------------------------------------------------------------------------------------- grouping
class UnionFind:
    """Disjoint sets over integer ids with path halving; enough for 780 images."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def thumbnails(items: list[ImageItem]) -> tuple[np.ndarray, np.ndarray]:
    """(dHash bits (N, 64) bool, 64x64 grey thumbnails (N, 4096) float32) for every image."""
    bits = np.empty((len(items), 64), dtype=bool)
    thumbs = np.empty((len(items), 64 * 64), dtype=np.float32)
    for i, item in enumerate(items):
        gray = to_gray_float(load_image(item.path))
        small = cv2.resize(gray, (9, 8), interpolation=cv2.INTER_AREA)
        bits[i] = (small[:, 1:] > small[:, :-1]).ravel()
        thumbs[i] = cv2.resize(gray, (64, 64), interpolation=cv2.INTER_AREA).ravel()
    return bits, thumbs


def perceptual_pairs(
    bits: np.ndarray, thumbs: np.ndarray, max_hamming: int = DHASH_MAX_HAMMING, min_corr: float = MIN_CORRELATION
) -> list[tuple[int, int]]:
    """Index pairs (i < j) judged the same picture by dHash distance or thumbnail correlation (O(N^2), vectorised)."""
    b = bits.astype(np.int32)
    hamming = b @ (1 - b).T + (1 - b) @ b.T
    z = thumbs - thumbs.mean(axis=1, keepdims=True)
    z /= np.linalg.norm(z, axis=1, keepdims=True) + 1e-8
    corr = z @ z.T
    same = (hamming <= max_hamming) | (corr >= min_corr)
    i, j = np.nonzero(np.triu(same, k=1))
    return list(zip(i.tolist(), j.tolist()))


def listed_pairs(csv_path: Path, index: dict[str, int]) -> list[tuple[int, int]]:
    """Pairs from ``near_duplicate_candidates.csv`` (columns image_a, image_b) as indices; unknown names skipped."""
    if not csv_path.is_file():
        return []
    table = pd.read_csv(csv_path)
    return [
        (index[a], index[b]) for a, b in zip(table["image_a"], table["image_b"]) if a in index and b in index
    ]


def group_ids(n: int, pairs: list[tuple[int, int]]) -> np.ndarray:
    """Connected-component id per image; ids are the smallest member index, so they are stable."""
    sets = UnionFind(n)
    for a, b in pairs:
        sets.union(a, b)
    return np.array([sets.find(i) for i in range(n)])


# ----------------------------------------------------------------------------------------------- folds
def assign_folds(classes: np.ndarray, groups: np.ndarray, excluded: np.ndarray, seed: int = SEED) -> np.ndarray:
    """Fold label per image: ``excluded``, ``test`` (one outer fold) or ``"0".."4"`` (inner folds)."""
    fold = np.full(classes.shape, EXCLUDED, dtype=object)
    keep = np.flatnonzero(~excluded)
    outer = StratifiedGroupKFold(n_splits=5, shuffle=True, random_state=seed)
    rest_pos, test_pos = next(outer.split(np.zeros(keep.size), classes[keep], groups[keep]))
    fold[keep[test_pos]] = TEST
    rest = keep[rest_pos]
    inner = StratifiedGroupKFold(n_splits=5, shuffle=True, random_state=seed)
    for k, (_, val_pos) in enumerate(inner.split(np.zeros(rest.size), classes[rest], groups[rest])):
        fold[rest[val_pos]] = str(k)
    return fold


def make_split(data_root: Path, seed: int = SEED) -> pd.DataFrame:
    """The split table: one row per image with columns image, class, group, fold."""
    items = discover(Path(data_root)).items
    rels = [item.rel for item in items]
    index = {rel: i for i, rel in enumerate(rels)}
    pairs = listed_pairs(Path(data_root) / "near_duplicate_candidates.csv", index)
    bits, thumbs = thumbnails(items)
    pairs += perceptual_pairs(bits, thumbs)
    groups = group_ids(len(items), pairs)
    classes = np.array([item.true_class for item in items])
    # One picture, two labels (benign 433 == malignant 145): neither label can be trusted, so neither file is
    # used anywhere. Matched by name here and confirmed by content hash so a renamed copy is caught too.
    excluded = np.isin(rels, EXCLUDED_IDENTICAL) | _byte_identical_cross_class(items)
    fold = assign_folds(classes, groups, excluded, seed)
    return pd.DataFrame(
        {"image": rels, "class": classes, "group": [f"g{g:03d}" for g in groups], "fold": fold}
    )


def _byte_identical_cross_class(items: list[ImageItem]) -> np.ndarray:
    """True for files whose exact bytes also occur under a different class."""
    digests = [hashlib.sha256(item.path.read_bytes()).hexdigest() for item in items]
    classes_by_digest: dict[str, set[str | None]] = {}
    for digest, item in zip(digests, items):
        classes_by_digest.setdefault(digest, set()).add(item.true_class)
    return np.array([len(classes_by_digest[d]) > 1 for d in digests])


def load_split(path: Path) -> pd.DataFrame:
    """The split CSV with ``fold`` as strings ("test", "0".."4", "excluded")."""
    return pd.read_csv(path, dtype={"image": str, "class": str, "group": str, "fold": str})


def summary(split: pd.DataFrame) -> str:
    """Counts per fold and class, and the largest groups, for the console and the README."""
    table = pd.crosstab(split["fold"], split["class"], margins=True)
    sizes = Counter(split["group"])
    multi = sum(1 for s in sizes.values() if s > 1)
    return f"{table}\n\ngroups: {len(sizes)} ({multi} with >1 image; largest {max(sizes.values())})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/busi"))
    parser.add_argument("--out", type=Path, default=Path("train/splits/busi_v1.csv"))
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    split = make_split(args.data, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    split.to_csv(args.out, index=False, lineterminator="\n")
    print(summary(split))


if __name__ == "__main__":
    main()
