"""The ``busi-batch`` command line: parse options, call one library function, map the outcome to an exit code.

Exit codes: 0 every image ok; 3 finished, but some files failed (see predictions.csv); 2 usage error;
1 fatal error (model cannot be loaded, output not writable, another run holds the output folder);
4 interrupted by SIGTERM / Ctrl-C after saving what was done (run again to resume).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from . import __version__
from .errors import BusiBatchError, UsageError

EXIT_OK, EXIT_FATAL, EXIT_USAGE, EXIT_FILE_ERRORS, EXIT_INTERRUPTED = 0, 1, 2, 3, 4

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Batch lesion segmentation and classification of breast ultrasound images. "
    "A research tool, not a diagnostic device.",
    epilog="Exit codes: 0 all ok, 3 finished with per-file errors, 2 usage error, 1 fatal error, 4 interrupted.",
)


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
    batch_size: int = typer.Option(16, "--batch-size", "-b", help="Images per forward pass."),
    workers: int = typer.Option(2, "--workers", "-j", help="Decoding worker processes (0 = in the main process)."),
    tta: bool = typer.Option(False, "--tta", help="Average with the horizontally flipped image (slower)."),
    pixel_size: Optional[float] = typer.Option(
        None, "--pixel-size", help="Pixel size in mm; adds lesion_area_mm2 to the CSV."
    ),
    force: bool = typer.Option(False, "--force", help="Redo every image, even unchanged ones."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar and no summary line (errors still)."),
) -> None:
    """Segment and classify every image under STUDY; write masks, predictions.csv, run.json (and metrics.json).

    Example: busi-batch run ./study --out ./study-results

    Exit codes: 0 all ok, 3 finished with per-file errors, 2 usage error, 1 fatal, 4 interrupted.
    """
    from .pipeline import RunConfig, RunInterrupted, run as run_pipeline

    _configure_logging(quiet)
    config = RunConfig.for_study(
        study, out, weights=weights, labels=labels, masks=masks, device=device, batch_size=batch_size,
        workers=workers, tta=tta, pixel_size_mm=pixel_size, force=force,
        progress=not quiet and sys.stderr.isatty(),
    )
    try:
        summary = run_pipeline(config)
    except UsageError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(EXIT_USAGE) from err
    except RunInterrupted as err:
        typer.echo(f"interrupted: {err}", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from err
    except BusiBatchError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(EXIT_FATAL) from err
    if not quiet:
        typer.echo(summary.line(), err=True)
    raise typer.Exit(EXIT_FILE_ERRORS if summary.failed else EXIT_OK)


@app.command()
def bench(
    study: Optional[Path] = typer.Argument(None, help="Folder to measure on (default: a synthetic study)."),
    synthetic: int = typer.Option(200, help="Images in the synthetic study when STUDY is not given."),
    weights: Optional[Path] = typer.Option(None, help="Checkpoint (default: the shipped model)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
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
    try:
        result = benchmark(study, synthetic, weights, device, batch_size, workers, baseline_limit)
    except UsageError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(EXIT_USAGE) from err
    except BusiBatchError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(EXIT_FATAL) from err
    typer.echo(result.table())
    if json_out is not None:
        write_json(result, json_out)


def main() -> None:
    """Console-script entry point."""
    app()
