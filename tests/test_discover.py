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


# ------------------------------------------------------------------------------------------------ DICOM


def test_dicom_is_found_by_content_whatever_its_name(tmp_path: Path) -> None:
    pytest.importorskip("pydicom")
    from test_dicom import gradient, make_dicom, make_sr

    study = tmp_path / "s"
    make_dicom(study / "US" / "IM0001", gradient(), sop_uid="1.2.3.1")        # no extension
    make_dicom(study / "US" / "1.2.3.2", gradient(), sop_uid="1.2.3.2")       # named by UID: the dots are the name
    make_dicom(study / "US" / "scan.txt", gradient(), sop_uid="1.2.3.3")      # a misleading extension
    make_sr(study / "US" / "SR0001")
    touch(study, "US/README", b"not DICOM, no extension")
    touch(study, "US/short", b"\0" * 20)
    touch(study, "US/IM0001_mask.png")
    os.mkfifo(study / "US" / "PIPE")  # sniffing must not block on it
    found = discover(study)
    by_name = {i.name: i for i in found.items}
    assert list(by_name) == ["US/1.2.3.2", "US/IM0001", "US/scan.txt"]
    assert all(i.is_dicom and i.frame == 1 and i.dicom is not None for i in found.items)
    assert by_name["US/IM0001"].dicom.identifiers.sop_uid == "1.2.3.1"
    assert [p.name for p in by_name["US/IM0001"].truth_masks] == ["IM0001_mask.png"]
    assert [(p, "structured report" in r) for p, r in found.skipped] == [("US/SR0001", True)]


def test_frames_all_gives_one_item_per_frame_named_file_hash_n(tmp_path: Path) -> None:
    pytest.importorskip("pydicom")
    import numpy as np
    from test_dicom import gradient, make_dicom

    make_dicom(tmp_path / "benign" / "CINE", np.stack([gradient()] * 3))
    make_dicom(tmp_path / "benign" / "ONE.dcm", gradient())
    touch(tmp_path, "benign/CINE#2_mask.png")
    touch(tmp_path, "benign/ONE_mask.png")
    first = discover(tmp_path)
    assert [(i.name, i.frame) for i in first.items] == [("benign/CINE", 1), ("benign/ONE.dcm", 1)]
    every = discover(tmp_path, frames="all")
    assert [(i.name, i.rel, i.frame) for i in every.items] == [
        ("benign/CINE#1", "benign/CINE", 1), ("benign/CINE#2", "benign/CINE", 2), ("benign/CINE#3", "benign/CINE", 3),
        ("benign/ONE.dcm", "benign/ONE.dcm", 1),
    ]
    assert [len(i.truth_masks) for i in every.items] == [0, 1, 0, 1]  # per frame; .dcm dropped from the stem
    assert {i.true_class for i in every.items} == {"benign"}
    with pytest.raises(UsageError, match="--frames"):
        discover(tmp_path, frames="some")


def test_corrupt_dicom_is_still_an_item(tmp_path: Path) -> None:
    touch(tmp_path, "IM0004", b"\0" * 128 + b"DICM" + bytes(range(256)) * 8)
    (item,) = discover(tmp_path).items
    assert (item.name, item.is_dicom, item.dicom, item.frame) == ("IM0004", True, None, None)


def test_anonymized_names_carry_no_patient_identifier(tmp_path: Path) -> None:
    pytest.importorskip("pydicom")
    from test_dicom import gradient, make_dicom

    folder = tmp_path / "DOE_JANE_PID73921"
    make_dicom(folder / "IM0001", gradient(), sop_uid="1.2.3.1")
    make_dicom(folder / "copy" / "IM0001", gradient(), sop_uid="1.2.3.1")  # the same instance twice
    touch(folder, "Jane notes 2019-04-17.png")
    os.symlink(folder / "copy", folder / "link")
    found = discover(folder.parent, anonymize=True)
    names = [i.name for i in found.items]
    # sorted by path: IM0001, "Jane notes ….png", copy/IM0001 (the second copy gets a hash of its path)
    assert names[0] == "1.2.3.1" and names[2].startswith("1.2.3.1~") and len(set(names)) == 3
    assert names[1] == "[removed]_[removed]_[removed]/[removed] notes [removed].png"
    assert found.skipped == [("[removed]_[removed]_[removed]/link", "symbolic link to a folder is not followed")]
    assert found.scrub("/data/DOE_JANE_PID73921/x") == "/data/[removed]_[removed]_[removed]/x"
    assert discover(folder.parent).scrub("DOE") == "DOE"  # not anonymised: nothing is scrubbed
