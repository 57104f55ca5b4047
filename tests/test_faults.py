"""Unattended operation under faults: kills, signals, concurrent runs, full disks, dying workers, bad models.

The subprocess tests run the real console entry point (``python -m busi_batch run``) on a small synthetic study
with the tiny random-weight checkpoint and ``--batch-size 2`` or 3, so a run has many batches and takes seconds.
They are marked slow (CI still runs them). Each one starts the run in a new session so that the test can signal
the whole process group, as a terminal, systemd or Slurm would, and check that no process is left behind.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from multiprocessing import active_children, resource_sharer
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from busi_batch import pipeline, runfolder
from busi_batch.cli import app
from busi_batch.discover import discover
from busi_batch.imageio import TEMP_PREFIX
from busi_batch.inference import predict
from busi_batch.model import load_model
from busi_batch.records import read_journal, read_results_csv
from conftest import make_tiny_checkpoint

runner = CliRunner()
REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------ helpers


def make_study(root: Path, count: int, seed: int = 0, with_truth: bool = True) -> Path:
    """``count`` small speckle images (40-120 px, mixed aspect) in benign/malignant/normal folders, with masks."""
    rng = np.random.default_rng(seed)
    classes = ("benign", "malignant", "normal")
    for i in range(count):
        h, w = int(rng.integers(40, 120)), int(rng.integers(40, 120))
        image = cv2.GaussianBlur(rng.integers(0, 256, (h, w)).astype(np.uint8), (5, 5), 1.5)
        folder = root / classes[i % 3]
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"img {i:03d}.png"), image)
        if with_truth:
            mask = np.zeros((h, w), np.uint8)
            if classes[i % 3] != "normal":
                cv2.circle(mask, (w // 2, h // 2), min(h, w) // 4, 255, -1)
            cv2.imwrite(str(folder / f"img {i:03d}_mask.png"), mask)
    return root


def invoke(*args: str | Path):
    return runner.invoke(app, ["run", *map(str, args)])


def start_run(
    study: Path, out: Path, weights: Path, *extra: str, python: list[str] | None = None
) -> subprocess.Popen:
    """The real CLI in a new session (its own process group), stderr captured; ``python``: how to start it."""
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, *(python or ["-m", "busi_batch"]), "run", str(study), "--out", str(out),
           "--weights", str(weights), "--quiet", *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_for(condition, timeout: float = 120.0, proc: subprocess.Popen | None = None) -> bool:
    """Poll until ``condition()``; False if the process ended first or time ran out."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.02)
    return False


def group_members(pgid: int) -> list[int]:
    """Live processes of a process group (zombies excluded), from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state != "Z":
            members.append(int(entry.name))
    return members


def signal_at_mask(monkeypatch: pytest.MonkeyPatch, n: int, sig: signal.Signals) -> None:
    """Send ``sig`` to this process while the ``n``-th mask of an in-process run is encoded: mid-batch, exactly."""
    written = []
    encode = pipeline.encode_mask_png

    def encode_and_signal(mask):
        written.append(1)
        if len(written) == n:
            os.kill(os.getpid(), sig)
        return encode(mask)

    monkeypatch.setattr(pipeline, "encode_mask_png", encode_and_signal)


def resume_group(pgid: int) -> None:
    """SIGCONT to a process group frozen with SIGSTOP, if anything of it is left."""
    try:
        os.killpg(pgid, signal.SIGCONT)
    except ProcessLookupError:
        pass


def assert_no_orphans(pgid: int, within: float) -> None:
    """Every process of the run's group (main process, DataLoader workers) is gone within ``within`` s."""
    assert wait_for(lambda: not group_members(pgid), timeout=within), f"left behind: {group_members(pgid)}"


def journal_rows(out: Path) -> int:
    return len(read_journal(out / pipeline.JOURNAL_NAME))


def assert_valid_state(out: Path) -> None:
    """What a killed run leaves: a readable CSV and journal, one row per image, and only whole mask files."""
    rows = read_results_csv(out / pipeline.CSV_NAME) if (out / pipeline.CSV_NAME).exists() else []
    assert len({r.image for r in rows}) == len(rows)
    read_journal(out / pipeline.JOURNAL_NAME)
    for path in (out / pipeline.MASKS_DIR).rglob("*") if (out / pipeline.MASKS_DIR).exists() else []:
        if path.is_file() and not path.name.startswith(TEMP_PREFIX):
            mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            assert mask is not None and mask.ndim == 2, f"damaged mask file {path}"
            assert set(np.unique(mask)) <= {0, 255}
    if (out / pipeline.RUN_JSON).exists():
        json.loads((out / pipeline.RUN_JSON).read_text())


def no_temp_files(out: Path) -> bool:
    return not [p for p in out.rglob(f"{TEMP_PREFIX}*")]


def compare_with_reference(out: Path, reference: Path) -> None:
    """Same rows (probabilities within 1e-4) and masks identical up to a few threshold-edge pixels.

    Why a tolerance: a resumed run puts different images together in a batch, and a different batch makes
    oneDNN/BLAS take other summation orders, so probabilities move in the 7th digit; a pixel whose lesion
    probability sits exactly at the threshold can then flip.
    """
    got = {r.image: r for r in read_results_csv(out / pipeline.CSV_NAME)}
    want = {r.image: r for r in read_results_csv(reference / pipeline.CSV_NAME)}
    assert list(got) == list(want)
    for name, ref in want.items():
        row = got[name]
        assert (row.status, row.error, row.pred_class, row.width, row.height, row.input_sha256) == (
            ref.status, ref.error, ref.pred_class, ref.width, ref.height, ref.input_sha256), name
        if not ref.ok:
            continue
        for field in ("p_normal", "p_benign", "p_malignant"):
            assert getattr(row, field) == pytest.approx(getattr(ref, field), abs=1e-4), (name, field)
        a = cv2.imread(str(out / row.mask), cv2.IMREAD_UNCHANGED)
        b = cv2.imread(str(reference / ref.mask), cv2.IMREAD_UNCHANGED)
        assert a.shape == b.shape
        assert int((a != b).sum()) <= max(5, a.size // 500), name
        assert int((a > 0).sum()) == row.lesion_area_px


@pytest.fixture(scope="module")
def fault_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    study = make_study(tmp_path_factory.mktemp("fault") / "study", 36)
    (study / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    return study


@pytest.fixture(scope="module")
def reference(fault_study: Path, tiny_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run every faulty run is compared with."""
    out = tmp_path_factory.mktemp("reference") / "out"
    result = invoke(fault_study, "--out", out, "--weights", tiny_weights, "-b", "2", "-j", "0", "-q")
    assert result.exit_code == 3, result.output
    return out


# ------------------------------------------------------------------------------------------------ SIGKILL


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_equals_uninterrupted(
    fault_study: Path, reference: Path, tiny_weights: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    rng = random.Random(20240611)
    kills_mid_inference = 0
    for attempt in range(3):
        proc = start_run(fault_study, out, tiny_weights, "-b", "2", "-j", "2")
        if attempt == 0:
            time.sleep(rng.uniform(0.2, 3.0))  # anywhere: start-up, model load, discovery or inference
        else:
            # rows done (CSV and journal: a run folds the journal it finds into the CSV as it starts)
            before = len(runfolder.previous_rows(out))
            assert wait_for(lambda: len(runfolder.previous_rows(out)) > before, proc=proc), proc.communicate()[1]
            # at once: a tiny model on 36 small images finishes its inference in about 0.2 s on an idle machine,
            # and a later kill would leave the next attempt nothing to be killed in the middle of
            time.sleep(rng.uniform(0.0, 0.03))
        os.killpg(proc.pid, signal.SIGSTOP)  # frozen: what is checked next is the moment of the kill
        if attempt > 0:  # proven mid-inference: the run had started writing rows and had not finished
            assert proc.poll() is None and json.loads((out / pipeline.RUN_JSON).read_text())["status"] == "running"
            kills_mid_inference += 1
        if attempt == 1:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole group, as `kill -9 -PGID` or a job scheduler
        else:
            os.kill(proc.pid, signal.SIGKILL)  # the main process only, as the OOM killer
            resume_group(proc.pid)
        proc.wait(timeout=60)
        assert_no_orphans(proc.pid, within=20)  # orphaned decoding workers notice and leave (PyTorch watchdog)
        assert_valid_state(out)
        if attempt == 0:  # its folder was valid; the next attempts need work left to be killed in the middle of
            shutil.rmtree(out, ignore_errors=True)
    assert kills_mid_inference == 2
    done_before = len(runfolder.previous_rows(out))

    final = start_run(fault_study, out, tiny_weights, "-b", "2", "-j", "2")
    _, stderr = final.communicate(timeout=180)
    assert final.returncode == 3, stderr  # 3: the one corrupt file
    assert_no_orphans(final.pid, within=10)
    run = json.loads((out / pipeline.RUN_JSON).read_text())
    assert run["status"] == "complete" and run["counts"]["found"] == 37
    assert run["counts"]["skipped_unchanged"] >= done_before - 1 > 0  # resumed: the killed runs' work was kept
    rows = read_results_csv(out / pipeline.CSV_NAME)
    assert len(rows) == 37 and len({r.image for r in rows}) == 37
    assert not (out / pipeline.JOURNAL_NAME).exists() and no_temp_files(out)
    compare_with_reference(out, reference)
    metrics = json.loads((out / pipeline.METRICS_JSON).read_text())
    want = json.loads((reference / pipeline.METRICS_JSON).read_text())
    assert metrics["classification"]["n_images"] == want["classification"]["n_images"] == 36
    assert metrics["segmentation"]["dice_mean"] == pytest.approx(want["segmentation"]["dice_mean"], abs=0.02)


# ------------------------------------------------------------------------------------------------ SIGTERM / SIGINT


@pytest.mark.slow
def test_sigterm_to_process_group_stops_after_the_batch(
    fault_study: Path, reference: Path, tiny_weights: Path, tmp_path: Path
) -> None:
    """SIGTERM to the whole group, workers included, as systemd or Slurm send it: clean stop, exit 4.

    (Without the workers' blocked signal mask, PyTorch's worker handler exits on a SIGTERM that its parent did
    not send, and the run died with "DataLoader worker ... killed by signal". SIGINT, as Ctrl-C sends it to the
    group, takes the same path; it is tested in-process below.)
    """
    sig = signal.SIGTERM
    out = tmp_path / "out"
    proc = start_run(fault_study, out, tiny_weights, "-b", "3", "-j", "2")
    assert wait_for(lambda: journal_rows(out) >= 3, proc=proc), proc.communicate()[1]
    os.killpg(proc.pid, signal.SIGSTOP)  # frozen, so the signal below provably lands mid-run
    assert proc.poll() is None and journal_rows(out) < 37
    os.killpg(proc.pid, sig)
    resume_group(proc.pid)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 4, stderr
    assert "Traceback" not in stderr and "DataLoader worker" not in stderr and "reached a decoding worker" not in stderr
    lines = [line for line in stderr.splitlines() if line.startswith("interrupted:")]
    assert len(lines) == 1 and f"stopped by {sig.name}" in lines[0] and "run again to finish" in lines[0]
    done = int(lines[0].split(" after ")[1].split()[0])
    assert done % 3 == 0 and 3 <= done < 37  # whole batches only
    assert_no_orphans(proc.pid, within=10)
    rows = read_results_csv(out / pipeline.CSV_NAME)
    assert len(rows) == done
    assert not (out / pipeline.JOURNAL_NAME).exists() and no_temp_files(out)
    run = json.loads((out / pipeline.RUN_JSON).read_text())
    assert run["status"] == "interrupted" and run["interrupted"] is True
    kept = sum(r.ok for r in rows)  # an error row (corrupt.png) is tried again
    rerun = invoke(fault_study, "--out", out, "--weights", tiny_weights, "-b", "3", "-j", "0")
    assert rerun.exit_code == 3 and f"{37 - kept} processed, {kept} unchanged" in rerun.output
    compare_with_reference(out, reference)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_batch_finishes_exactly_that_batch(
    sig: signal.Signals, fault_study: Path, tiny_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The signal lands while the 5th mask is written (2nd batch of 3): exactly 6 images are done and saved."""
    out = tmp_path / "out"
    signal_at_mask(monkeypatch, 5, sig)
    result = invoke(fault_study, "--out", out, "--weights", tiny_weights, "-b", "3", "-j", "0")
    assert result.exit_code == 4, result.output
    assert f"stopped by {sig.name} after 6 images" in result.output
    assert len(read_results_csv(out / pipeline.CSV_NAME)) == 6
    assert len(list((out / "masks").rglob("*.png"))) == 6


def test_resume_at_batch_size_one_is_bit_identical(
    fault_study: Path, tiny_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exact, not approximate: with one image per batch a resumed run meets every image in the same batch (of
    one) as an uninterrupted run, so on CPU its probabilities and mask bytes are the same to the bit. (Larger
    batches are compared with a tolerance in ``compare_with_reference``, which says why.)"""
    reference = tmp_path / "reference"
    assert invoke(fault_study, "--out", reference, "--weights", tiny_weights, "-b", "1", "-j", "0").exit_code == 3
    out = tmp_path / "out"
    signal_at_mask(monkeypatch, 10, signal.SIGTERM)
    assert invoke(fault_study, "--out", out, "--weights", tiny_weights, "-b", "1", "-j", "0").exit_code == 4
    monkeypatch.undo()
    resumed = invoke(fault_study, "--out", out, "--weights", tiny_weights, "-b", "1", "-j", "0")
    assert resumed.exit_code == 3 and "10 unchanged" in resumed.output
    got, want = read_results_csv(out / pipeline.CSV_NAME), read_results_csv(reference / pipeline.CSV_NAME)
    assert got == want
    for row in want:
        if row.ok:
            assert (out / row.mask).read_bytes() == (reference / row.mask).read_bytes(), row.image
    assert (out / pipeline.METRICS_JSON).read_bytes() == (reference / pipeline.METRICS_JSON).read_bytes()


def test_signal_before_inference_processes_nothing(
    fault_study: Path, tiny_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = pipeline.plan_work

    def plan_then_signal(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return plan(*args, **kwargs)

    monkeypatch.setattr(pipeline, "plan_work", plan_then_signal)
    result = invoke(fault_study, "--out", tmp_path / "out", "--weights", tiny_weights, "-j", "0")
    assert result.exit_code == 4 and "after 0 images" in result.output


# ------------------------------------------------------------------------------------------------ locking


@pytest.mark.slow
def test_second_run_is_refused_and_a_killed_run_leaves_no_stuck_lock(
    fault_study: Path, tiny_weights: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    first = start_run(fault_study, out, tiny_weights, "-b", "1", "-j", "0")
    assert wait_for(lambda: journal_rows(out) >= 1, proc=first), first.communicate()[1]
    os.killpg(first.pid, signal.SIGSTOP)  # frozen mid-run, lock held, however fast this machine is
    second = invoke(fault_study, "--out", out, "--weights", tiny_weights, "-j", "0")
    assert second.exit_code == 1
    assert "another busi-batch run is using this output folder" in second.output
    assert f"pid {first.pid} " in second.output  # the message names the holder
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=60)
    third = invoke(fault_study, "--out", out, "--weights", tiny_weights, "-j", "0", "-b", "4")
    assert third.exit_code == 3, third.output  # the lock died with the process
    assert len(read_results_csv(out / pipeline.CSV_NAME)) == 37


# ------------------------------------------------------------------------------------------------ full disk


@pytest.mark.parametrize("what", ["every write", "journal"])
def test_full_disk_mid_run_is_fatal_clear_and_leaves_valid_files(
    what: str, fault_study: Path, reference: Path, tiny_weights: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "out"
    calls = {"n": 0}
    if what == "every write":  # after a few files, every rename into place fails: nothing new lands
        replace = os.replace

        def full_disk(src, dst):
            calls["n"] += 1
            if calls["n"] > 8:
                raise OSError(errno.ENOSPC, "No space left on device")
            return replace(src, dst)

        monkeypatch.setattr(os, "replace", full_disk)
    else:  # the journal append fails at the 2nd commit (masks and CSV still fit); the 1st is the first batch alone
        append = runfolder.append_bytes

        def journal_full(path, data, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:  # a run commits at least twice: the first batch at once, the rest by the end
                os.write(os.open(path, os.O_WRONLY | os.O_APPEND), data[:10])  # a torn line, as a full disk leaves
                raise pipeline.OutputWriteError(f"{path}: cannot write: No space left on device")
            return append(path, data, **kwargs)

        monkeypatch.setattr(runfolder, "append_bytes", journal_full)
    result = invoke(fault_study, "--out", out, "--weights", tiny_weights, "-b", "2", "-j", "0")
    assert result.exit_code == 1, result.output
    last = result.output.strip().splitlines()[-1]  # the CLI's one-line verdict
    assert last.startswith("error: ") and "No space left on device" in last and str(out) in last
    assert no_temp_files(out)
    assert_valid_state(out)
    monkeypatch.undo()  # space freed
    rerun = invoke(fault_study, "--out", out, "--weights", tiny_weights, "-b", "2", "-j", "0")
    assert rerun.exit_code == 3, rerun.output
    assert " 0 unchanged" not in rerun.output  # the images done before the failure were kept
    compare_with_reference(out, reference)


# ------------------------------------------------------------------------------------------------ workers


# The main process fetches each batch tensor's shared-memory descriptor from the worker that sent it. When that
# worker has just been killed, the fetch fails with ConnectionResetError a moment before the worker can be reaped
# (a moment a loaded machine stretches), and PyTorch passed the socket error on as it was: an uncaught exception
# whose traceback kept PyTorch's iterator, and so its workers, alive until exit, where multiprocessing SIGTERMs
# them (they block SIGTERM) and waits without a timeout: the run hung. This makes that moment certain.
WORKER_KILLED_AS_ITS_BATCH_IS_FETCHED = """
import errno, os, signal, sys
from multiprocessing import active_children, resource_sharer
from pathlib import Path
from busi_batch.pipeline import JOURNAL_NAME
journal, detach = Path(sys.argv[sys.argv.index("--out") + 1]) / JOURNAL_NAME, resource_sharer.DupFd.detach
def fetch_from_a_worker_just_killed(self):  # the first batch fetched once two rows are saved
    if journal.exists() and journal.read_bytes().count(b"\\n") >= 2:
        resource_sharer.DupFd.detach = detach
        os.kill(min(p.pid for p in active_children()), signal.SIGKILL)
        raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
    return detach(self)
resource_sharer.DupFd.detach = fetch_from_a_worker_just_killed
sys.argv[0] = "busi-batch"
from busi_batch.cli import main
main()
"""


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["any", "as its batch is fetched"])
def test_a_killed_decoding_worker_is_a_clear_fatal_error(
    moment: str, fault_study: Path, tiny_weights: Path, tmp_path: Path
) -> None:
    """The OOM killer takes a worker: one clear line, exit 1, what was done saved, the rerun completes."""
    out = tmp_path / "out"
    if moment == "any":  # from outside, once the run is under way: wherever the main process then is
        proc = start_run(fault_study, out, tiny_weights, "-b", "2", "-j", "2")
        assert wait_for(lambda: journal_rows(out) >= 2, timeout=600, proc=proc), proc.communicate()[1]
        workers = [pid for pid in group_members(proc.pid) if pid != proc.pid]
        assert workers, "no decoding workers found"
        os.kill(workers[0], signal.SIGKILL)
    else:
        proc = start_run(fault_study, out, tiny_weights, "-b", "2", "-j", "2",
                         python=["-c", WORKER_KILLED_AS_ITS_BATCH_IS_FETCHED])
    try:
        _, stderr = proc.communicate(timeout=300)  # a hang is for ever; a loaded machine needs a while to exit
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1, stderr
    assert "Traceback" not in stderr
    assert "error: a decoding worker process died" in stderr and "run again to resume" in stderr
    assert_no_orphans(proc.pid, within=20)
    assert no_temp_files(out) and journal_rows(out) >= 2
    assert json.loads((out / pipeline.RUN_JSON).read_text())["status"] == "failed"
    rerun = invoke(fault_study, "--out", out, "--weights", tiny_weights, "-b", "2", "-j", "0")
    assert rerun.exit_code == 3 and len(read_results_csv(out / pipeline.CSV_NAME)) == 37


def test_predict_names_a_worker_killed_as_its_batch_is_fetched_and_stops_the_others_at_once(
    fault_study: Path, tiny_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same moment as above, in-process: the error names the dead worker, and no worker outlives predict.

    ``caught`` keeps the exception, and so PyTorch's iterator, referenced, as ``sys.last_traceback`` does for an
    uncaught one: the other worker must be gone anyway, not whenever the iterator is garbage collected.
    """
    loaded = load_model(tiny_weights, torch.device("cpu"))
    items = discover(fault_study).items
    before = {p.pid for p in active_children()}
    detach = resource_sharer.DupFd.detach
    seen: dict[str, Any] = {"fetches": 0}

    def fetch_from_a_worker_just_killed(self):
        seen["fetches"] += 1
        if seen["fetches"] == 3:
            seen["workers"] = sorted(p.pid for p in active_children() if p.pid not in before)
            os.kill(seen["workers"][0], signal.SIGKILL)
            raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
        return detach(self)

    monkeypatch.setattr(resource_sharer.DupFd, "detach", fetch_from_a_worker_just_killed)
    with pytest.raises(RuntimeError, match="DataLoader worker") as caught:
        for _ in predict(loaded, items, batch_size=2, workers=2, with_truth=False):
            pass
    victim, other = seen["workers"]
    assert str(victim) in str(caught.value) and str(other) not in str(caught.value)
    assert wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in (victim, other)), timeout=10)


# ------------------------------------------------------------------------------------------------ changed inputs


def test_content_not_modification_time_decides_what_is_redone(tiny_weights: Path, tmp_path: Path) -> None:
    study = make_study(tmp_path / "study", 6)
    out = tmp_path / "out"
    assert invoke(study, "--out", out, "--weights", tiny_weights, "-j", "0").exit_code == 0
    touched, edited, deleted = study / "benign" / "img 000.png", study / "malignant" / "img 001.png", \
        study / "normal" / "img 002.png"
    os.utime(touched, (time.time() + 3600, time.time() + 3600))  # newer, same bytes: not redone
    stat = edited.stat()
    image = cv2.imread(str(edited), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(edited), 255 - image)  # new bytes, old modification time: redone
    os.utime(edited, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    old_mask = out / next(r.mask for r in read_results_csv(out / "predictions.csv") if r.image.endswith("002.png"))
    deleted.unlink()
    result = invoke(study, "--out", out, "--weights", tiny_weights, "-j", "0")
    assert result.exit_code == 0 and "1 processed, 4 unchanged" in result.output
    rows = {r.image: r for r in read_results_csv(out / "predictions.csv")}
    assert "normal/img 002.png" not in rows and not old_mask.exists()  # dropped: row and mask
    assert rows["malignant/img 001.png"].input_sha256 == hashlib.sha256(edited.read_bytes()).hexdigest()
    assert json.loads((out / "run.json").read_text())["counts"]["removed_since_last_run"] == 1


# ------------------------------------------------------------------------------------------------ bad model


def _architecture_swapped(weights: Path) -> None:
    card = json.loads(weights.with_suffix(".json").read_text())
    card["architecture"]["depth"] = 4  # the weights are a depth-3 network; the sha256 still matches
    weights.with_suffix(".json").write_text(json.dumps(card))


def _random_bytes_with_matching_card(weights: Path) -> None:
    weights.write_bytes(os.urandom(5000))
    card = json.loads(weights.with_suffix(".json").read_text())
    card["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    weights.with_suffix(".json").write_text(json.dumps(card))


@pytest.mark.parametrize("damage, reason", [
    (lambda w: w.write_bytes(w.read_bytes()[:-100]), "does not match"),
    (lambda w: w.write_bytes(w.read_bytes()[:100] + b"X" + w.read_bytes()[101:]), "does not match"),
    (_architecture_swapped, "cannot load weights"),
    (_random_bytes_with_matching_card, "cannot load weights"),
    (lambda w: w.with_suffix(".json").unlink(), "model card not found"),
    (lambda w: w.with_suffix(".json").write_text('{"name": '), "invalid model card"),
])
def test_tampered_or_wrong_model_is_refused_before_any_image(
    damage, reason: str, fault_study: Path, tmp_path: Path
) -> None:
    weights = make_tiny_checkpoint(tmp_path / "model.pt")
    damage(weights)
    out = tmp_path / "out"
    result = invoke(fault_study, "--out", out, "--weights", weights, "-j", "0")
    assert result.exit_code == 1, result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("error: ") and "model." in line and reason in line
    assert not (out / "masks").exists() and not (out / pipeline.CSV_NAME).exists()
    assert not (out / pipeline.RUN_JSON).exists()
