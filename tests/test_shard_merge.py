"""``--shard I/N`` and ``busi-batch merge``: a deterministic split, and a merge equal to one unsharded run."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from busi_batch.cli import app
from busi_batch.discover import ImageItem
from busi_batch.errors import UsageError
from busi_batch.pipeline import output_lock
from busi_batch.records import read_results_csv
from busi_batch.shard import Shard, missing_shards, shard_of
from conftest import make_tiny_checkpoint, tree_digest
from test_faults import make_study

runner = CliRunner()
N = 3
IMAGES = 22  # + 2 extra files; with these names the shards hold 8, 3 and 13 images
TOTAL = IMAGES + 2


def run_cli(*args: str | Path):
    return runner.invoke(app, [*map(str, args)])


# ---------------------------------------------------------------------------------------------- the split


def test_shard_is_sha1_of_the_path_bytes() -> None:
    """The documented definition, so any machine, language or Python version gets the same split."""
    for rel in ["benign/benign (1).png", "a/b/ü.png", "x" * 300]:
        digest = hashlib.sha1(rel.encode("utf-8")).digest()
        assert shard_of(rel, 7) == int.from_bytes(digest[:8], "big") % 7 + 1
    # pinned values: if these change, shards of a study split by an earlier version would not merge
    assert [shard_of(f"img{i}.png", 4) for i in range(8)] == [
        int.from_bytes(hashlib.sha1(f"img{i}.png".encode()).digest()[:8], "big") % 4 + 1 for i in range(8)]
    assert shard_of("benign/benign (1).png", 4) == 3 and shard_of("normal/normal (1).png", 4) == 2


def test_every_image_in_exactly_one_shard_and_balanced() -> None:
    rels = [f"part{i // 100:03d}/case {i}.png" for i in range(4000)]
    items = [ImageItem(path=Path(r), rel=r) for r in rels]
    parts = [Shard(i, 4).select(items) for i in range(1, 5)]
    assert sorted(r.rel for p in parts for r in p) == sorted(rels)
    assert all(800 <= len(p) <= 1200 for p in parts), [len(p) for p in parts]
    assert all([i.rel for i in p] == [r for r in rels if shard_of(r, 4) == k] for k, p in enumerate(parts, 1))


def test_adding_files_moves_no_other_file() -> None:
    before = {f"img{i}.png": shard_of(f"img{i}.png", 5) for i in range(200)}
    after = {f"img{i}.png": shard_of(f"img{i}.png", 5) for i in range(400)}
    assert all(after[k] == v for k, v in before.items())


def test_non_utf8_names_have_a_stable_shard() -> None:
    name = b"bad\xff.png".decode("utf-8", "surrogateescape")
    assert shard_of(name, 4) == int.from_bytes(hashlib.sha1(b"bad\xff.png").digest()[:8], "big") % 4 + 1


@pytest.mark.parametrize("text", ["0/4", "5/4", "1/0", "a/b", "3", "", "-1/4", "1/4/2"])
def test_bad_shard_specs(text: str) -> None:
    with pytest.raises(UsageError, match="--shard"):
        Shard.parse(text)


def test_shard_spec_and_missing() -> None:
    assert Shard.parse(" 2 / 8 ") == Shard(2, 8) and str(Shard(2, 8)) == "2/8"
    assert missing_shards([Shard(1, 4), Shard(3, 4)]) == [2, 4]


def test_bad_shard_on_the_command_line_is_a_usage_error(sample_study: Path, tiny_weights: Path,
                                                      tmp_path: Path) -> None:
    result = run_cli("run", sample_study, "--out", tmp_path / "o", "--weights", tiny_weights, "--shard", "4/3")
    assert result.exit_code == 2 and "--shard 4/3" in result.output


# ---------------------------------------------------------------------------------------------- run + merge


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_study(tmp_path_factory.mktemp("shards") / "study", IMAGES, seed=3)
    (root / "benign" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk" * 10)
    (root / "benign" / "img 003.jpg").write_bytes((root / "benign" / "img 003.png").read_bytes())  # same stem
    return root


@pytest.fixture(scope="module")
def sharded(study: Path, tiny_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One unsharded run and N shard runs, batch size 1 so every image meets the network alone (bit-equal)."""
    base = tmp_path_factory.mktemp("runs")
    folders = {"whole": base / "whole"}
    result = run_cli("run", study, "--out", folders["whole"], "--weights", tiny_weights, "-b", "1", "-j", "0", "-q")
    assert result.exit_code == 3, result.output
    for i in range(1, N + 1):
        folders[f"s{i}"] = base / f"s{i}"
        result = run_cli("run", study, "--out", folders[f"s{i}"], "--weights", tiny_weights, "-b", "1", "-j", "0",
                         "--shard", f"{i}/{N}", "-q")
        assert result.exit_code in (0, 3), result.output
    return folders


def test_shards_partition_the_study(sharded: dict[str, Path]) -> None:
    whole = [r.image for r in read_results_csv(sharded["whole"] / "predictions.csv")]
    parts = [[r.image for r in read_results_csv(sharded[f"s{i}"] / "predictions.csv")] for i in range(1, N + 1)]
    assert sorted(x for p in parts for x in p) == sorted(whole) and len(whole) == TOTAL
    assert all(p for p in parts)
    for i, part in enumerate(parts, start=1):
        assert all(shard_of(image, N) == i for image in part)
        run = json.loads((sharded[f"s{i}"] / "run.json").read_text())
        assert run["shard"] == f"{i}/{N}" and run["study_images"] == TOTAL and run["counts"]["found"] == len(part)
    # mask names come from the whole study: the two "img 003" images, in different shards or not, get two masks
    rows = {r.image: r for i in range(1, N + 1) for r in read_results_csv(sharded[f"s{i}"] / "predictions.csv")}
    jpg, png = rows["benign/img 003.jpg"].mask, rows["benign/img 003.png"].mask
    assert jpg != png and jpg.startswith("masks/benign/img 003~") and png.startswith("masks/benign/img 003~")


def test_merge_equals_the_unsharded_run(sharded: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "all"
    result = run_cli("merge", *(sharded[f"s{i}"] for i in range(1, N + 1)), "--out", out)
    assert result.exit_code == 3, result.output  # 3: the corrupt file is an error row, as in the whole run
    whole = sharded["whole"]
    assert (out / "predictions.csv").read_bytes() == (whole / "predictions.csv").read_bytes()
    assert json.loads((out / "metrics.json").read_text()) == json.loads((whole / "metrics.json").read_text())
    truth = json.loads((out / "ground_truth.json").read_text())["truth_masks"]
    assert truth == json.loads((whole / "ground_truth.json").read_text())["truth_masks"] and truth
    rows = read_results_csv(out / "predictions.csv")
    for row in rows:
        if row.ok:
            assert (out / row.mask).read_bytes() == (whole / row.mask).read_bytes()
    run = json.loads((out / "run.json").read_text())
    assert run["merged"] is True and run["status"] == "complete" and run["shard"] is None
    assert run["counts"]["found"] == TOTAL and run["counts"]["error"] == 1
    assert [m["shard"] for m in run["merged_from"]] == [f"{i}/{N}" for i in range(1, N + 1)]
    assert run["model"]["sha256"] == rows[0].model_sha256
    # merging again is idempotent, and the merged folder resumes like any run folder
    again = run_cli("merge", *(sharded[f"s{i}"] for i in range(1, N + 1)), "--out", out, "-q")
    assert again.exit_code == 3 and (out / "predictions.csv").read_bytes() == (whole / "predictions.csv").read_bytes()


def test_merge_writes_a_report(sharded: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("busi_batch.report")
    out, report = tmp_path / "all", tmp_path / "all.html"
    result = run_cli("merge", *(sharded[f"s{i}"] for i in range(1, N + 1)), "--out", out, "--report", report,
                     "--report-pages", "none")
    assert result.exit_code == 3, result.output
    assert report.is_file() and "img 003" in report.read_text(encoding="utf-8")


def test_merged_folder_resumes_as_a_run(sharded: dict[str, Path], study: Path, tiny_weights: Path,
                                        tmp_path: Path) -> None:
    out = tmp_path / "all"
    assert run_cli("merge", *(sharded[f"s{i}"] for i in range(1, N + 1)), "--out", out, "-q").exit_code == 3
    rerun = run_cli("run", study, "--out", out, "--weights", tiny_weights, "-b", "1", "-j", "0")
    assert rerun.exit_code == 3
    assert f"1 processed, {TOTAL - 1} unchanged" in rerun.output  # only the error row is tried again


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_merge_refuses_different_models(sharded: dict[str, Path], study: Path, tmp_path: Path) -> None:
    other = make_tiny_checkpoint(tmp_path / "other.pt", seed=5)
    s2 = tmp_path / "s2-other"
    made = run_cli("run", study, "--out", s2, "--weights", other, "-j", "0", "--shard", f"2/{N}", "-q")
    assert made.exit_code in (0, 3)
    result = run_cli("merge", sharded["s1"], s2, sharded["s3"], "--out", tmp_path / "all")
    assert result.exit_code == 1 and "different models" in result.output
    assert not (tmp_path / "all" / "predictions.csv").exists()


@pytest.mark.parametrize("case, message", [
    ("missing", "shards missing: 3/3"),
    ("twice", "shard 1/3 twice"),
    ("unsharded", "is not a shard"),
    ("killed", "did not finish (status running"),
    ("interrupted", "did not finish (status interrupted"),
    ("journal", "journal of an unfinished run"),
    ("row missing", "rows, but the run found"),
    ("duplicate image", "is in both"),
    ("other study", "shards saw different studies"),
])
def test_merge_refuses_what_would_not_be_one_honest_study(
    case: str, message: str, sharded: dict[str, Path], tmp_path: Path
) -> None:
    s1, s2, s3 = (_copy(sharded[f"s{i}"], tmp_path / f"s{i}") for i in range(1, N + 1))
    folders = [s1, s2, s3]

    def edit_run(folder: Path, **changes) -> None:
        data = json.loads((folder / "run.json").read_text())
        data.update(changes)
        (folder / "run.json").write_text(json.dumps(data))

    if case == "missing":
        folders = [s1, s2]
    elif case == "twice":
        folders = [s1, _copy(s1, tmp_path / "s1-again"), s2, s3]
    elif case == "unsharded":
        folders = [s1, s2, s3, sharded["whole"]]
    elif case == "killed":
        edit_run(s2, status="running")
    elif case == "interrupted":
        edit_run(s2, status="interrupted", interrupted=True)
    elif case == "journal":
        (s3 / ".predictions.journal").write_text("")
    elif case == "row missing":
        lines = (s2 / "predictions.csv").read_text().splitlines(keepends=True)
        (s2 / "predictions.csv").write_text("".join(lines[:-1]))
    elif case == "duplicate image":
        extra = (s1 / "predictions.csv").read_text().splitlines(keepends=True)[1]
        (s2 / "predictions.csv").write_text((s2 / "predictions.csv").read_text() + extra)
        edit_run(s2, counts={**json.loads((s2 / "run.json").read_text())["counts"],
                             "found": len(read_results_csv(s2 / "predictions.csv"))})
    elif case == "other study":
        edit_run(s3, study_images=TOTAL + 1)
    result = run_cli("merge", *folders, "--out", tmp_path / "all")
    assert result.exit_code == 1, result.output
    assert message in result.output and result.output.startswith("error: ")
    assert not (tmp_path / "all" / "predictions.csv").exists()


def test_merge_refuses_a_shard_still_running_and_writes_nothing_into_inputs(
    sharded: dict[str, Path], tmp_path: Path
) -> None:
    folders = [_copy(sharded[f"s{i}"], tmp_path / f"s{i}") for i in range(1, N + 1)]
    with output_lock(folders[1]):  # as a run in progress holds it
        busy = run_cli("merge", *folders, "--out", tmp_path / "all")
    assert busy.exit_code == 1 and "a busi-batch run is still using this folder (pid" in busy.output
    before = [tree_digest(f) for f in folders]
    assert run_cli("merge", *folders, "--out", tmp_path / "all", "-q").exit_code == 3
    assert [tree_digest(f) for f in folders] == before


def test_merge_usage_errors(sharded: dict[str, Path], tmp_path: Path) -> None:
    inside = run_cli("merge", sharded["s1"], sharded["s2"], sharded["s3"], "--out", sharded["s1"] / "all")
    assert inside.exit_code == 2 and "may not be, or be inside, an input folder" in inside.output
    absent = run_cli("merge", tmp_path / "nope", "--out", tmp_path / "all")
    assert absent.exit_code == 2 and "no such output folder" in absent.output


def test_output_folder_of_another_shard_is_refused(study: Path, tiny_weights: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = run_cli("run", study, "--out", out, "--weights", tiny_weights, "-j", "0", "--shard", "1/3", "-q")
    assert first.exit_code in (0, 3)
    result = run_cli("run", study, "--out", out, "--weights", tiny_weights, "-j", "0", "--shard", "2/3")
    assert result.exit_code == 2 and "holds the results of shard 1/3" in result.output
    unsharded = run_cli("run", study, "--out", out, "--weights", tiny_weights, "-j", "0")
    assert unsharded.exit_code == 2 and "this run is unsharded" in unsharded.output
    forced = run_cli("run", study, "--out", out, "--weights", tiny_weights, "-j", "0", "--shard", "2/3", "--force")
    assert forced.exit_code in (0, 3)
    assert {shard_of(r.image, 3) for r in read_results_csv(out / "predictions.csv")} == {2}
