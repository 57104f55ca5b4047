"""Discovery: stable order, BUSI ground-truth pairing, labels and mirrored masks, odd folder contents."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from busi_batch.discover import class_from_path, discover, is_mask_name
from busi_batch.errors import UsageError


def touch(root: Path, rel: str, data: bytes = b"x") -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_busi_layout_pairs_masks_and_classes(tmp_path: Path) -> None:
    for rel in ["Benign/b (1).png", "Benign/b (1)_mask.png", "Benign/b (1)_mask_1.png",
                "malignant/sub/m (2).png", "malignant/sub/m (2)_mask.png", "normal/n (3).png",
                "other/x.jpg", "notes.txt"]:
        touch(tmp_path, rel)
    study = discover(tmp_path)
    by_rel = {i.rel: i for i in study.items}
    assert list(by_rel) == ["Benign/b (1).png", "malignant/sub/m (2).png", "normal/n (3).png", "other/x.jpg"]
    assert by_rel["Benign/b (1).png"].true_class == "benign"
    assert [p.name for p in by_rel["Benign/b (1).png"].truth_masks] == ["b (1)_mask.png", "b (1)_mask_1.png"]
    assert by_rel["malignant/sub/m (2).png"].true_class == "malignant"
    assert by_rel["normal/n (3).png"].truth_masks == ()
    assert by_rel["other/x.jpg"].true_class is None
    assert study.has_ground_truth


def test_order_is_stable_and_sorted(tmp_path: Path) -> None:
    names = ["z.png", "a.PNG", "m/b.tif", "m/a.bmp", "B.jpeg"]
    for name in names:
        touch(tmp_path, name)
    assert [i.rel for i in discover(tmp_path).items] == sorted(names)


def test_mask_names() -> None:
    assert is_mask_name("x_mask.png") and is_mask_name("x_MASK_12.png")
    assert not is_mask_name("x_masked.png") and not is_mask_name("mask.png") and not is_mask_name("x_mask.txt")


def test_class_from_nearest_parent() -> None:
    assert class_from_path("benign/malignant/a.png") == "malignant"
    assert class_from_path("a.png") is None


def test_labels_file_overrides_folders(tmp_path: Path) -> None:
    study_dir = tmp_path / "s"
    touch(study_dir, "benign/a.png")
    touch(study_dir, "b.png")
    labels = tmp_path / "labels.csv"
    labels.write_text("image,class\nbenign/a.png,Malignant\nb.png,normal\n")
    by_rel = {i.rel: i for i in discover(study_dir, labels_csv=labels).items}
    assert by_rel["benign/a.png"].true_class == "malignant"
    assert by_rel["b.png"].true_class == "normal"


def test_bad_labels_file_is_usage_error(tmp_path: Path) -> None:
    touch(tmp_path / "s", "a.png")
    labels = tmp_path / "labels.csv"
    labels.write_text("image,class\na.png,cyst\n")
    with pytest.raises(UsageError, match="labels.csv:2: unknown class 'cyst'"):
        discover(tmp_path / "s", labels_csv=labels)


def test_mirrored_masks_folder(tmp_path: Path) -> None:
    touch(tmp_path / "s", "p/a.png")
    touch(tmp_path / "s", "p/b.png")
    touch(tmp_path / "gt", "p/a_mask.png")
    touch(tmp_path / "gt", "p/b.png")
    items = discover(tmp_path / "s", masks_root=tmp_path / "gt").items
    assert [m.relative_to(tmp_path).as_posix() for i in items for m in i.truth_masks] == ["gt/p/a_mask.png",
                                                                                          "gt/p/b.png"]


def test_symlinked_folder_loop_is_not_followed(tmp_path: Path) -> None:
    touch(tmp_path, "d/a.png")
    os.symlink(tmp_path / "d", tmp_path / "d" / "loop")
    study = discover(tmp_path)
    assert [i.rel for i in study.items] == ["d/a.png"]
    assert study.skipped and "symbolic link" in study.skipped[0][1]


def test_missing_root_is_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        discover(tmp_path / "nope")
