"""The output folder is owned: busi-batch never deletes or overwrites what it did not write (issue 14).

Each test here failed on the code before ``runfolder`` (the reason is in its docstring).
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import shutil
import signal
import time
import unicodedata
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from busi_batch import imageio, inference, loader, runfolder
from busi_batch.cli import app
from busi_batch.discover import ImageItem
from busi_batch.records import (
    ImageResult, neutralise_cell, read_journal, read_results_csv, restore_cell, results_to_csv, write_results_csv,
)
from conftest import make_tiny_checkpoint, tree_digest
from test_faults import (
    assert_no_orphans, group_members, journal_rows, make_study, resume_group, start_run, wait_for,
)

runner = CliRunner()
LOCK = ".busi-batch.lock"  # its holder line is rewritten by every run that takes the lock


def invoke(*args: str | Path):
    return runner.invoke(app, ["run", *map(str, args)])


@pytest.fixture(scope="module")
def small_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_study(tmp_path_factory.mktemp("own") / "study", 9)


@pytest.fixture
def done(small_study: Path, tiny_weights: Path, tmp_path: Path) -> Path:
    """A finished output folder of ``small_study``."""
    out = tmp_path / "out"
    result = invoke(small_study, "--out", out, "--weights", tiny_weights, "-j", "0", "-q")
    assert result.exit_code == 0, result.output
    return out


# ------------------------------------------------------------------------------------------- temporaries


def test_clean_up_never_touches_files_outside_its_own_temp_folder(
    small_study: Path, tiny_weights: Path, done: Path
) -> None:
    """Before: every ``.tmp-*`` under --out was deleted, a study inside --out and other projects' files included."""
    inside = done / "incoming"
    shutil.copytree(small_study, inside)
    image = next(small_study.rglob("img 000.png")).read_bytes()
    for folder in (inside / "benign", done, done / "masks", done / "notes"):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / ".tmp-keep.png").write_bytes(image)
        (folder / f"{imageio.TEMP_PREFIX}looks-ours.png").write_bytes(image)
    stale = done / runfolder.TEMP_DIR / f"{imageio.TEMP_PREFIX}killed.png"
    stale.write_bytes(b"left by a killed write")
    study_before = tree_digest(inside)
    # the study moved into the output folder: the same images, so the same study, resumed (two images more)
    result = invoke(inside, "--out", done, "--weights", tiny_weights, "-j", "0")
    assert result.exit_code == 0, result.output
    assert "2 processed, 9 unchanged" in result.output
    assert tree_digest(inside) == study_before
    for folder in (done, done / "masks", done / "notes"):
        assert (folder / ".tmp-keep.png").read_bytes() == image
        assert (folder / f"{imageio.TEMP_PREFIX}looks-ours.png").read_bytes() == image
    assert not stale.exists()


def test_atomic_writes_fsync_the_file_and_its_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: no fsync, so a power cut could lose a write that had returned."""
    synced: list[str] = []
    real = os.fsync

    def recording(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    target = tmp_path / "sub" / "file.bin"
    imageio.atomic_write_bytes(target, b"data")
    assert len(synced) == 2
    assert os.path.basename(synced[0]).startswith(imageio.TEMP_PREFIX)  # the data, before the rename
    assert synced[1] == str(target.parent)  # then the folder holding the new name
    synced.clear()
    imageio.append_bytes(tmp_path / "journal", b"line\n")
    assert synced == [str(tmp_path / "journal"), str(tmp_path)]


def test_masks_are_synced_before_their_rows_are_journalled(
    small_study: Path, tiny_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    sync, append = runfolder.sync_filesystem, runfolder.append_bytes
    monkeypatch.setattr(runfolder, "sync_filesystem", lambda folder: (events.append("sync"), sync(folder))[1])
    monkeypatch.setattr(runfolder, "append_bytes",
                        lambda *a, **k: (events.append("journal"), append(*a, **k))[1])
    assert invoke(small_study, "--out", tmp_path / "out", "--weights", tiny_weights, "-b", "3", "-j", "0").exit_code == 0
    assert events and events == ["sync", "journal"] * (len(events) // 2)  # the first batch at once, then grouped
    assert len(read_journal(tmp_path / "out" / runfolder.JOURNAL_NAME)) == 0  # folded into the CSV at the end
    assert len(read_results_csv(tmp_path / "out" / runfolder.CSV_NAME)) == 9


# ------------------------------------------------------------------------------------------- ownership


def test_a_folder_busi_batch_did_not_make_is_refused_untouched(
    small_study: Path, tiny_weights: Path, tmp_path: Path
) -> None:
    """Before: a project folder's own predictions.csv, metrics.json and run.json were overwritten."""
    project = tmp_path / "project"
    project.mkdir()
    for name, text in (("predictions.csv", "id,score\n1,0.5\n"), ("metrics.json", '{"auc": 0.9}'),
                       ("run.json", '{"experiment": "mine"}')):
        (project / name).write_text(text)
    before = tree_digest(project)
    for extra in ([], ["--force"]):
        result = invoke(small_study, "--out", project, "--weights", tiny_weights, "-j", "0", "-q", *extra)
        assert result.exit_code == 5, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and "not a busi-batch output folder" in lines[0] and "predictions.csv" in lines[0]
        assert tree_digest(project) == before


def test_merge_into_a_folder_busi_batch_did_not_make_is_refused(done: Path, tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "predictions.csv").write_text("mine\n")
    result = runner.invoke(app, ["merge", str(done), "--out", str(project)])
    assert result.exit_code == 5 and "not a busi-batch output folder" in result.output
    assert (project / "predictions.csv").read_text() == "mine\n" and sorted(os.listdir(project)) == ["predictions.csv"]


def test_an_empty_folder_is_taken(small_study: Path, tiny_weights: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert invoke(small_study, "--out", tmp_path / "empty", "--weights", tiny_weights, "-j", "0").exit_code == 0


def test_another_study_is_refused_with_what_would_be_replaced(
    tiny_weights: Path, done: Path, tmp_path: Path
) -> None:
    """Before: a different study silently deleted the first study's masks, rows and metrics (exit 0, -q silent)."""
    other = make_study(tmp_path / "other", 5, seed=3)
    for path in sorted(other.rglob("*.png")):
        path.rename(path.with_name("x" + path.name))  # other names: nothing in common with the first study
    before = tree_digest(done, skip=(LOCK,))
    result = invoke(other, "--out", done, "--weights", tiny_weights, "-j", "0", "-q")
    assert result.exit_code == 5
    (line,) = result.output.strip().splitlines()
    assert "holds 9 results (9 masks, predictions.csv, metrics.json)" in line
    assert "another study" in line and str(other.resolve()) in line and "--force" in line
    assert tree_digest(done, skip=(LOCK,)) == before
    forced = invoke(other, "--out", done, "--weights", tiny_weights, "-j", "0", "-q", "--force")
    assert forced.exit_code == 0
    assert len(read_results_csv(done / runfolder.CSV_NAME)) == 5


def test_the_same_study_elsewhere_or_a_few_images_more_or_less_is_still_the_same_study(
    small_study: Path, tiny_weights: Path, done: Path, tmp_path: Path
) -> None:
    moved = shutil.copytree(small_study, tmp_path / "moved")
    result = invoke(moved, "--out", done, "--weights", tiny_weights, "-j", "0")
    assert result.exit_code == 0 and "0 processed, 9 unchanged" in result.output
    next(moved.rglob("img 000.png")).unlink()
    shutil.copy(next(moved.rglob("img 001.png")), moved / "benign" / "new.png")
    nightly = invoke(moved, "--out", done, "--weights", tiny_weights, "-j", "0")
    assert nightly.exit_code == 0 and "1 processed, 8 unchanged" in nightly.output


def test_other_settings_are_refused_unless_forced(small_study: Path, tiny_weights: Path, done: Path) -> None:
    before = tree_digest(done, skip=(LOCK,))
    result = invoke(small_study, "--out", done, "--weights", tiny_weights, "-j", "0", "--tta")
    assert result.exit_code == 5 and "made with settings" in result.output and "tta=0" in result.output
    assert tree_digest(done, skip=(LOCK,)) == before
    assert invoke(small_study, "--out", done, "--weights", tiny_weights, "-j", "0", "--tta", "--force").exit_code == 0


def test_an_empty_study_is_its_own_exit_code(tiny_weights: Path, tmp_path: Path) -> None:
    """Before: exit 0, which a cron job reads as success."""
    empty = tmp_path / "empty"
    empty.mkdir()
    result = invoke(empty, "--out", tmp_path / "o1", "--weights", tiny_weights, "-q")
    assert result.exit_code == 6
    (line,) = result.output.strip().splitlines()
    assert str(empty) in line and "no images" in line
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("hello")
    (junk / "clip.gif").write_bytes(b"GIF89a")
    result = invoke(junk, "--out", tmp_path / "o2", "--weights", tiny_weights, "-q")
    assert result.exit_code == 6 and "no images" in result.output


# ------------------------------------------------------------------------------------------- mask names


def item(name: str) -> ImageItem:
    return ImageItem(path=Path("/nonexistent") / name, rel=name)


#: Names built to collide: case variants, one name's stem equal to another's full name, Unicode spellings (NFC
#: and NFD), and characters a file system may fold away.
_PARTS = st.sampled_from(["a", "A", "a.png", "A.PNG", "a.png.png", "a.jpg", "é", unicodedata.normalize("NFD", "é"),
                          "ß", "SS", "~", "_mask", "#1", "x" * 120, ".", " ", "b", "dir/"])
_NAMES = st.lists(st.lists(_PARTS, min_size=1, max_size=4).map("".join), min_size=1, max_size=12, unique=True)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_NAMES)
def test_mask_names_never_collide(names: list[str]) -> None:
    """Before: ``a.png`` and ``a.png.png`` (or ``a.jpg``) both wrote ``masks/a.png_mask.png``."""
    names = [n for n in names if not n.endswith("/") and "//" not in n and not n.startswith("/")]
    masks = runfolder.mask_relpaths([item(n) for n in names])
    keys = [unicodedata.normalize("NFC", m).casefold() for m in masks.values()]
    assert len(set(keys)) == len(names)
    for mask in masks.values():
        assert mask.startswith("masks/") and mask.endswith("_mask.png")
        assert all(len(part.encode()) <= 255 for part in mask.split("/"))
    assert runfolder.mask_relpaths([item(n) for n in reversed(names)]) == masks  # order does not matter


def test_colliding_names_end_to_end_each_row_points_at_its_own_mask(tiny_weights: Path, tmp_path: Path) -> None:
    study = tmp_path / "study"
    study.mkdir()
    sizes = {"a.png": (40, 60), "a.png.png": (70, 50), "a.jpg": (64, 64)}
    for name, (h, w) in sizes.items():
        cv2.imwrite(str(study / name), np.random.default_rng(len(name)).integers(0, 255, (h, w), np.uint8))
    out = tmp_path / "out"
    assert invoke(study, "--out", out, "--weights", tiny_weights, "-j", "0").exit_code == 0
    rows = read_results_csv(out / runfolder.CSV_NAME)
    assert len({r.mask for r in rows}) == 3
    for row in rows:
        mask = cv2.imread(str(out / row.mask), cv2.IMREAD_UNCHANGED)
        assert mask.shape == sizes[row.image], row.image


# ------------------------------------------------------------------------------------------- formulas in CSV


@given(st.text())
def test_neutralised_cells_round_trip(text: str) -> None:
    cell = neutralise_cell(text)
    assert restore_cell(cell) == text
    assert not cell.startswith(("=", "+", "-", "@", "\t", "\r"))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(st.characters(blacklist_categories=("Cs",)), min_size=1), min_size=1, max_size=5,
                unique=True))
def test_csv_round_trips_any_names(names: list[str]) -> None:
    rows = [ImageResult(image=n, status="error", error=n, mask=f"masks/{n}") for n in names]
    text = results_to_csv(rows)
    for record in list(csv.reader(io.StringIO(text, newline="")))[1:]:  # read as a spreadsheet would
        assert not any(cell.startswith(("=", "+", "-", "@", "\t", "\r")) for cell in record)
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"busi-csv-{os.getpid()}.csv"
    try:
        write_results_csv(path, rows)
        back = read_results_csv(path)
    finally:
        path.unlink(missing_ok=True)
    assert [(r.image, r.error, r.mask) for r in back] == [(n, n, f"masks/{n}") for n in names]


def test_formula_names_are_neutralised_and_resume_merge_report_keep_the_real_names(
    tiny_weights: Path, tmp_path: Path
) -> None:
    """Before: ``=HYPERLINK(...)`` was written raw into predictions.csv, and a spreadsheet ran it."""
    study = tmp_path / "study"
    study.mkdir()
    names = ["=HYPERLINK(\"http:x\").png", "+1.png", "-2.png", "@SUM(A1).png", "'quoted.png"]
    for i, name in enumerate(names):
        cv2.imwrite(str(study / name), np.full((40, 40), 30 * i, np.uint8))
    out = tmp_path / "out"
    assert invoke(study, "--out", out, "--weights", tiny_weights, "-j", "0").exit_code == 0
    with open(out / runfolder.CSV_NAME, newline="") as fh:
        cells = [c for record in list(csv.reader(fh))[1:] for c in record]
    assert not [c for c in cells if c[:1] in ("=", "+", "-", "@")]
    assert sorted(r.image for r in read_results_csv(out / runfolder.CSV_NAME)) == sorted(names)
    rerun = invoke(study, "--out", out, "--weights", tiny_weights, "-j", "0")
    assert "0 processed, 5 unchanged" in rerun.output
    merged = runner.invoke(app, ["merge", str(out), "--out", str(tmp_path / "merged"), "--report",
                                 str(tmp_path / "r.html")])
    assert merged.exit_code == 0, merged.output
    assert sorted(r.image for r in read_results_csv(tmp_path / "merged" / runfolder.CSV_NAME)) == sorted(names)
    html = (tmp_path / "r.html").read_text()
    assert "=HYPERLINK(&#34;http:x&#34;).png" in html or '=HYPERLINK("http:x").png' in html


# ------------------------------------------------------------------------------------------- workers and lock


def test_too_many_workers_are_clamped_with_a_clear_message(
    small_study: Path, tiny_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: --workers 100000 forked until the out-of-memory killer ended the run."""
    monkeypatch.setattr(loader, "max_workers", lambda: 2)
    seen: list[int] = []
    real = inference.predict

    def spy(*args, **kwargs):
        seen.append(kwargs["workers"])
        return real(*args, **kwargs)

    monkeypatch.setattr("busi_batch.pipeline.predict", spy)
    result = invoke(small_study, "--out", tmp_path / "out", "--weights", tiny_weights, "-j", "100000")
    assert result.exit_code == 0, result.output
    assert "--workers 100000 is more than this machine can hold (at most 2 here" in result.output
    assert seen == [2]


def test_the_limit_follows_cpus_and_available_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(loader, "_available_memory", lambda: 100 * loader.WORKER_MEMORY_BYTES)
    assert loader.max_workers() == 2 * loader.WORKERS_PER_CPU
    monkeypatch.setattr(loader, "_available_memory", lambda: 3 * loader.WORKER_MEMORY_BYTES)
    assert loader.max_workers() == 3
    monkeypatch.setattr(loader, "_available_memory", lambda: 0)
    assert loader.max_workers() == 1
    assert loader.worker_count(1) == 1


def test_a_forked_child_does_not_hold_the_output_lock(tmp_path: Path) -> None:
    """Before: an flock is shared across fork, so a worker that outlived its run kept the folder locked."""
    ready_r, ready_w = os.pipe()
    with runfolder.output_lock(tmp_path):
        child = os.fork()
        if child == 0:  # pragma: no cover - the child only says it runs, then waits to be killed
            os.write(ready_w, b"r")  # after os.fork returned here, so after the fork hooks ran in this child
            time.sleep(60)
            os._exit(0)
        assert os.read(ready_r, 1) == b"r"  # the child is alive (and would hold the lock without the hook)
    try:
        with open(tmp_path / runfolder.LOCK_NAME) as fh:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raised BlockingIOError while the child lived
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


@pytest.mark.slow
def test_rerun_the_moment_after_a_sigkill_of_the_main_process_proceeds(
    tiny_weights: Path, tmp_path: Path
) -> None:
    """Before: the decoding workers outlived the killed main process for seconds, holding the lock, and the rerun
    exited 1 with "another busi-batch run is using this output folder (pid <the dead run>)"."""
    study = make_study(tmp_path / "study", 120)  # long enough to be caught mid-run on a loaded machine
    out = tmp_path / "out"
    proc = start_run(study, out, tiny_weights, "-b", "2", "-j", "2")
    assert wait_for(lambda: journal_rows(out) >= 2, proc=proc), proc.communicate()[1]
    os.killpg(proc.pid, signal.SIGSTOP)  # frozen mid-run, however fast this machine is
    workers = [pid for pid in group_members(proc.pid) if pid != proc.pid]
    assert workers and journal_rows(out) < 120
    os.kill(proc.pid, signal.SIGKILL)  # the main process only, as the OOM killer does
    proc.wait(timeout=30)
    resume_group(proc.pid)
    rerun = invoke(study, "--out", out, "--weights", tiny_weights, "-b", "4", "-j", "0")
    assert rerun.exit_code == 0, rerun.output
    assert_no_orphans(proc.pid, within=2)  # the workers died with their parent, not seconds later


# ------------------------------------------------------------------------------------------- consistency


def test_a_forced_rerun_with_another_model_is_consistent_at_every_commit(
    tiny_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every file the run commits is a moment it could be killed at: at each, every row the folder holds
    (CSV and journal) describes the mask beside it, and a resume from that moment ends as a clean run does.

    Before: the forced rerun overwrote masks while predictions.csv still held the old model's rows for them.
    """
    study = make_study(tmp_path / "study", 6)
    model_b = make_tiny_checkpoint(tmp_path / "b.pt", seed=5)
    refs = {}
    for label, weights in (("a", tiny_weights), ("b", model_b)):
        refs[label] = tmp_path / f"ref-{label}"
        assert invoke(study, "--out", refs[label], "--weights", weights, "-b", "2", "-j", "0").exit_code == 0
    sha = {label: read_results_csv(refs[label] / runfolder.CSV_NAME)[0].model_sha256 for label in refs}
    out = shutil.copytree(refs["a"], tmp_path / "out")
    snapshots: list[Path] = []
    replace = os.replace

    def snapshot_after(src, dst):
        replace(src, dst)
        if str(dst).startswith(str(out)):
            snapshots.append(shutil.copytree(out, tmp_path / f"snap{len(snapshots):03d}"))

    monkeypatch.setattr(os, "replace", snapshot_after)
    result = invoke(study, "--out", out, "--weights", model_b, "-b", "2", "-j", "0", "--force")
    monkeypatch.setattr(os, "replace", replace)
    assert result.exit_code == 0 and len(snapshots) > 6
    for snap in snapshots:
        rows = read_results_csv(snap / runfolder.CSV_NAME) if (snap / runfolder.CSV_NAME).exists() else []
        rows += read_journal(snap / runfolder.JOURNAL_NAME)
        for row in rows:
            label = "a" if row.model_sha256 == sha["a"] else "b"
            assert (snap / row.mask).read_bytes() == (refs[label] / row.mask).read_bytes(), (snap.name, row.image)
    middle = snapshots[len(snapshots) // 2]
    assert json.loads((middle / runfolder.RUN_JSON).read_text())["status"] == "running"  # it says so plainly
    resumed = invoke(study, "--out", middle, "--weights", model_b, "-b", "2", "-j", "0")
    assert resumed.exit_code == 0, resumed.output
    got = {r.image: r for r in read_results_csv(middle / runfolder.CSV_NAME)}
    want = {r.image: r for r in read_results_csv(refs["b"] / runfolder.CSV_NAME)}
    assert set(got) == set(want) and all(r.model_sha256 == sha["b"] for r in got.values())
