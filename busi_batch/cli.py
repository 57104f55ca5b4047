"""The ``busi-batch`` command line: parse options, call one library function, map the outcome to an exit code.

Exit codes: 0 every image ok; 3 finished, but some files failed (see predictions.csv); 2 usage error;
1 fatal error (model cannot be loaded, output not writable, another run holds the output folder);
4 interrupted by SIGTERM / Ctrl-C after saving what was done (run again to resume); 5 output folder refused
(not busi-batch's, or it holds results of another study, model or settings: nothing was written); 6 empty study
(no supported image found).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer

from . import __version__
from .errors import BusiBatchError, EmptyStudy, OutputFolderRefused, RunInterrupted, UsageError

EXIT_OK, EXIT_FATAL, EXIT_USAGE, EXIT_FILE_ERRORS, EXIT_INTERRUPTED = 0, 1, 2, 3, 4
EXIT_REFUSED, EXIT_EMPTY_STUDY = 5, 6
EXIT_CODES_TEXT = (
    "Exit codes: 0 all ok, 3 finished with per-file errors, 2 usage error, 1 fatal error, 4 interrupted, "
    "5 output folder refused, 6 empty study."
)
PRECISION_HELP = "Forward pass: auto (bf16 on GPUs and on CPUs with AMX/AVX512-BF16, else fp32), fp32 or bf16."

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Batch lesion segmentation and classification of breast ultrasound images. "
    "A research tool, not a diagnostic device.",
    epilog=EXIT_CODES_TEXT,
)


@contextmanager
def _exit_codes(prefix: str = "", usage_exit: int = EXIT_USAGE) -> Iterator[None]:
    """Our own errors become one line on stderr and their exit code; anything else is a bug and keeps its traceback."""
    try:
        yield
    except BusiBatchError as err:
        label, code = "error", EXIT_FATAL
        for kind, kind_label, kind_code in (
            (UsageError, "error", usage_exit), (RunInterrupted, "interrupted", EXIT_INTERRUPTED),
            (OutputFolderRefused, "refused", EXIT_REFUSED), (EmptyStudy, "error", EXIT_EMPTY_STUDY),
        ):
            if isinstance(err, kind):
                label, code = kind_label, kind_code
                break
        where = "" if isinstance(err, RunInterrupted) else prefix
        typer.echo(f"{label}: {where}{err}", err=True)
        raise typer.Exit(code) from err


def _configure_logging(quiet: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr, force=True
    )


def _version(value: bool) -> None:
    if value:
        typer.echo(f"busi-batch {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    pass


@app.command()
def run(
    study: Path = typer.Argument(..., help="Folder of ultrasound images (searched recursively)."),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="Output folder (default: ./<study name>-results); never inside STUDY."
    ),
    weights: Optional[Path] = typer.Option(None, help="Checkpoint (.pt with its .json card; default: the shipped model)."),
    labels: Optional[Path] = typer.Option(None, help="CSV with columns image,class (ground-truth classes)."),
    masks: Optional[Path] = typer.Option(None, help="Folder of ground-truth masks mirroring STUDY's layout."),
    device: str = typer.Option("auto", help="auto, cpu or cuda (auto = cuda when available)."),
    precision: str = typer.Option("auto", help=PRECISION_HELP),
    batch_size: int = typer.Option(16, "--batch-size", "-b", help="Images per forward pass."),
    workers: int = typer.Option(2, "--workers", "-j", help="Decoding worker processes (0 = in the main process)."),
    tta: bool = typer.Option(False, "--tta", help="Average with the horizontally flipped image (slower)."),
    pixel_size: Optional[float] = typer.Option(
        None, "--pixel-size", help="Pixel size in mm for inputs without DICOM calibration; adds lesion_area_mm2.",
    ),
    frames: str = typer.Option(
        "first", "--frames", metavar="first|all",
        help="Multi-frame DICOM: the first frame only, or all (one row and mask per frame, named FILE#N).",
    ),
    anonymize: bool = typer.Option(
        False, "--anonymize",
        help="No patient name, ID or date in any output: DICOM images named by SOP Instance UID, paths scrubbed.",
    ),
    force: bool = typer.Option(
        False, "--force",
        help="Redo every image, even unchanged ones; replaces the results of another study, model or settings "
        "in busi-batch's own output folder (never a folder busi-batch did not make).",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar and no summary line (errors still)."),
    shard: Optional[str] = typer.Option(
        None, "--shard", metavar="I/N",
        help="Process only shard I of N (1..N; by a hash of each image's path: stable across runs and machines). "
        "One output folder per shard, then busi-batch merge.",
    ),
    report: Optional[Path] = typer.Option(
        None, "--report", help="Also render a report (.pdf or .html) from the finished output folder."
    ),
    report_pages: str = typer.Option("all", "--report-pages", help="Per-image report pages: all, flagged or none."),
) -> None:
    """Segment and classify every image under STUDY; write masks, predictions.csv, run.json (and metrics.json).

    Example: busi-batch run ./study --out ./study-results

    The output folder must be new, empty, or busi-batch's own output of the same study with the same model and
    settings; anything else is refused (exit 5) unless --force replaces the results it holds.

    Exit codes: 0 all ok, 3 finished with per-file errors, 2 usage error, 1 fatal, 4 interrupted,
    5 output folder refused (nothing written), 6 empty study.
    """
    from .pipeline import RunConfig, run as run_pipeline
    from .report import validate_report_options
    from .shard import Shard

    _configure_logging(quiet)
    with _exit_codes():
        config = RunConfig.for_study(
            study, out, weights=weights, labels=labels, masks=masks, device=device, precision=precision,
            batch_size=batch_size,
            workers=workers, tta=tta, pixel_size_mm=pixel_size, force=force,
            progress=not quiet and sys.stderr.isatty(), shard=Shard.parse(shard) if shard is not None else None,
            frames=frames, anonymize=anonymize,
        )
        if report is not None:
            validate_report_options(report, report_pages)
        summary = run_pipeline(config)
    if not quiet:
        typer.echo(summary.line(), err=True)
    if report is not None:
        _render_report(summary.out, report, report_pages, quiet, usage_exit=EXIT_FATAL)
    raise typer.Exit(EXIT_FILE_ERRORS if summary.failed else EXIT_OK)


def _render_report(run_dir: Path, target: Path, pages: str, quiet: bool, usage_exit: int) -> None:
    """Render a report; a failure is one line on stderr and an exit (after a run, even a usage problem is fatal)."""
    from .report import render_report

    for noisy in ("weasyprint", "fontTools"):  # their progress and font-subsetting chatter is not ours to show
        logging.getLogger(noisy).setLevel(logging.ERROR)
    with _exit_codes("report: ", usage_exit=usage_exit):
        result = render_report(run_dir, target, pages=pages)
    if not quiet:
        pages_text = f", {result.total_pages} pages" if result.total_pages else ""
        typer.echo(f"busi-batch: report ({result.image_pages} image pages{pages_text}) -> {result.path}", err=True)


@app.command("report")
def report_command(
    run_dir: Path = typer.Argument(..., help="A finished output folder of `busi-batch run`."),
    report: Path = typer.Option(..., "--report", help="Report file to write: .pdf or .html."),
    report_pages: str = typer.Option("all", "--report-pages", help="Per-image pages: all, flagged or none."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No closing line (errors still)."),
) -> None:
    """Render the report of a finished run from its output folder, without running the model again.

    Example: busi-batch report ./study-results --report study-report.pdf --report-pages flagged

    Exit codes: 0 written, 2 usage error, 1 fatal (not a run folder, not writable).
    """
    _configure_logging(quiet)
    _render_report(run_dir, report, report_pages, quiet, usage_exit=EXIT_USAGE)
    raise typer.Exit(EXIT_OK)


@app.command()
def merge(
    folders: list[Path] = typer.Argument(..., help="Output folders of `busi-batch run --shard I/N` (all N of them)."),
    out: Path = typer.Option(..., "--out", "-o", help="Merged output folder (CSV, masks, metrics.json, run.json)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No closing line (errors still)."),
    report: Optional[Path] = typer.Option(None, "--report", help="Also render a report (.pdf or .html) of the whole."),
    report_pages: str = typer.Option("all", "--report-pages", help="Per-image report pages: all, flagged or none."),
) -> None:
    """Combine shard output folders into one, as a single run of the whole study would have written it.

    Refuses folders made by different models or settings, unfinished runs, missing or repeated shards, and
    images present twice.

    Example: busi-batch merge results-1 results-2 results-3 results-4 --out results --report results.pdf

    Exit codes: 0 merged, 3 merged but some images have status=error, 2 usage error, 1 cannot merge,
    5 output folder refused (not empty and not busi-batch's).
    """
    from .merge import merge_outputs
    from .report import validate_report_options

    _configure_logging(quiet)
    with _exit_codes():
        if report is not None:
            validate_report_options(report, report_pages)
        summary = merge_outputs(folders, out)
    if not quiet:
        typer.echo(summary.line(), err=True)
    if report is not None:
        _render_report(summary.out, report, report_pages, quiet, usage_exit=EXIT_FATAL)
    raise typer.Exit(EXIT_FILE_ERRORS if summary.failed else EXIT_OK)


@app.command()
def bench(
    study: Optional[Path] = typer.Argument(None, help="Folder to measure on (default: a synthetic study)."),
    synthetic: int = typer.Option(200, help="Images in the synthetic study when STUDY is not given."),
    weights: Optional[Path] = typer.Option(None, help="Checkpoint (default: the shipped model)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    precision: str = typer.Option("auto", help=PRECISION_HELP),
    batch_size: int = typer.Option(16, "--batch-size", "-b", help="Images per forward pass."),
    workers: int = typer.Option(2, "--workers", "-j", help="Decoding worker processes."),
    baseline_limit: Optional[int] = typer.Option(None, help="Time the baseline on the first N images only."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the results as JSON."),
) -> None:
    """Measure images/s of `run` against the one-image-at-a-time baseline, to choose --batch-size and --workers.

    Example: busi-batch bench --synthetic 300 --batch-size 16 --workers 2 --json bench.json
    """
    from .bench import benchmark, write_json

    _configure_logging(quiet=True)
    with _exit_codes():
        result = benchmark(study, synthetic, weights, device, batch_size, workers, baseline_limit,
                           precision=precision)
    typer.echo(result.table())
    if json_out is not None:
        write_json(result, json_out)


@app.command()
def demo(
    host: str = typer.Option("127.0.0.1", help="Address to listen on (127.0.0.1: this machine only)."),
    port: int = typer.Option(7860, help="Port to listen on."),
    weights: Optional[Path] = typer.Option(None, help="Checkpoint (default: the shipped model)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    precision: str = typer.Option("auto", help=PRECISION_HELP),
    pixel_size: Optional[float] = typer.Option(
        None, "--pixel-size", help="Pixel size in mm; the page then shows the lesion area in mm² too."
    ),
) -> None:
    """Serve the interactive web demo: upload one image, see its class, lesion mask and outline.

    Needs the optional demo extra (Gradio); exits 1 with the command that installs it when it is missing.
    Nothing leaves the machine: no analytics, no share link.

    Example: busi-batch demo --port 7860
    """
    from .demo import DemoConfig, serve

    _configure_logging(quiet=False)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own start-up probes of its local URL
    with _exit_codes():
        serve(DemoConfig(host=host, port=port, weights=weights, device=device, precision=precision,
                         pixel_size_mm=pixel_size))


def main() -> None:
    """Console-script entry point."""
    app()
