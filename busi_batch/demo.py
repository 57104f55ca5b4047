"""The interactive web demo (``busi-batch demo``): one image in, its class, lesion mask and outline out.

For quick looks at single images, for teaching, and for checking a model before a long batch job. Every number
on the page comes from the same functions as ``busi-batch run``: :func:`busi_batch.inference.predict` (decode,
preprocess, forward pass), :func:`busi_batch.rows.result_from_prediction` (mask at input size, area, count,
the CSV row), :func:`busi_batch.rows.score_masks` (Dice, IoU) and :func:`busi_batch.overlay.outline_overlay`. This
module only arranges their results on a page, so the demo cannot drift from the batch tool.

Gradio is an optional extra (``pip install "busi-batch[demo]"``), imported only when the demo starts; nothing
else in busi-batch imports this module. Nothing leaves the machine: Gradio's analytics, Hugging Face telemetry,
share links, the MCP server, the monitoring page and the browser-side run history are switched off, and the
server binds to 127.0.0.1 unless ``--host`` says otherwise. Uploads live in Gradio's temporary folder only,
which is swept hourly.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from . import __version__
from .classes import CLASS_NAMES
from .discover import IMAGE_SUFFIXES, ImageItem, discover
from .errors import BusiBatchError, ImageDecodeError, UsageError
from .imageio import atomic_write_bytes, encode_png, load_image
from .inference import predict
from .model import LoadedModel, ModelCard, load_model
from .overlay import outline_overlay
from .records import STATUS_ERROR, ImageResult
from .rows import result_from_prediction, settings_key, with_truth
from .runtime import select_device, select_precision

logger = logging.getLogger(__name__)

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
#: Largest upload Gradio accepts; far above any ultrasound frame. Pixel bombs are refused by the decoder's own
#: pixel limit (``imageio.MAX_PIXELS``) whatever their file size.
MAX_UPLOAD = "50mb"
INSTALL_HINT = 'the web demo needs Gradio, an optional extra; install it with: pip install "busi-batch[demo]"'
DISCLAIMER = "Research tool, not a diagnostic device."

#: Set (overriding the caller's environment) before Gradio is imported: every phone-home Gradio and
#: huggingface_hub know of is off, and the browser keeps no history of the images analysed.
PRIVACY_ENV: dict[str, str] = {
    "GRADIO_ANALYTICS_ENABLED": "False",
    "GRADIO_SHARE": "False",
    "GRADIO_MCP_SERVER": "False",
    "GRADIO_SSR_MODE": "False",
    "GRADIO_RUN_HISTORY": "False",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_OFFLINE": "1",
}


class DemoUnavailable(BusiBatchError):
    """Gradio (the ``demo`` extra) is not installed."""


@dataclass(frozen=True)
class DemoConfig:
    """What ``busi-batch demo`` was asked for."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    weights: Path | None = None
    device: str = "auto"
    precision: str = "auto"
    pixel_size_mm: float | None = None


@dataclass
class DemoResult:
    """One analysed image: the CSV row ``run`` would write, plus the pictures the page shows."""

    row: ImageResult
    overlay_rgb: np.ndarray | None = None
    mask: np.ndarray | None = None
    truth: np.ndarray | None = None

    @property
    def ok(self) -> bool:
        return self.row.ok


@dataclass
class PageView:
    """Everything the page's output components show, in a form that needs no Gradio to test."""

    markdown: str
    overlay_rgb: np.ndarray | None = None
    mask_image: np.ndarray | None = None
    truth_image: np.ndarray | None = None
    probabilities: dict[str, float] | None = None


# --------------------------------------------------------------------------------------------- analysis


def upload_item(path: str | Path) -> ImageItem:
    """An uploaded file as an item without ground truth; its name is the file name the user chose."""
    path = Path(path)
    return ImageItem(path=path, rel=path.name)


def example_items(root: Path = EXAMPLES_DIR) -> dict[str, ImageItem]:
    """The bundled example images (BUSI layout, so ``discover`` pairs their class and masks), by display name."""
    if not root.is_dir():
        return {}
    return {example_label(item): item for item in discover(root).items}


def example_label(item: ImageItem) -> str:
    return f"{Path(item.rel).stem} (ground truth: {item.true_class or 'unknown'})"


def analyse(loaded: LoadedModel, item: ImageItem, pixel_size_mm: float | None = None) -> DemoResult:
    """Run one image through exactly the path ``busi-batch run`` uses; a bad file gives an error row, not a raise."""
    prediction = next(predict(loaded, [item], batch_size=1, workers=0, with_truth=True)).predictions[0]
    row, mask = result_from_prediction(
        item, prediction, loaded, mask_rel="", settings=settings_key(loaded, tta=False), pixel_size_mm=pixel_size_mm
    )
    if mask is None:
        return DemoResult(row=with_truth(row, item))
    try:
        image = load_image(item.path)
    except ImageDecodeError as err:  # the file changed between the two reads
        return DemoResult(row=replace(with_truth(row, item), status=STATUS_ERROR, error=str(err)))
    truth = prediction.truth_mask
    row = with_truth(row, item, mask, truth, prediction.truth_error or "")
    overlay = cv2.cvtColor(outline_overlay(image, mask, truth), cv2.COLOR_BGR2RGB)
    return DemoResult(row=row, overlay_rgb=overlay, mask=mask, truth=truth)


def parse_pixel_size(value: float | None) -> float | None:
    """The page's pixel-size box: empty or 0 means unknown; a negative number is refused."""
    if value is None or value == 0:
        return None
    if not value > 0:
        raise ValueError("pixel size must be a positive number of millimetres (or empty)")
    return float(value)


def page_view(
    loaded: LoadedModel,
    upload: str | Path | None,
    example: str | None,
    pixel_size_mm: float | None,
    examples: dict[str, ImageItem],
) -> PageView:
    """What the page shows for an upload (which wins) or a bundled example; never raises for bad input."""
    try:
        pixel_size = parse_pixel_size(pixel_size_mm)
    except ValueError as err:
        return PageView(markdown=f"**Cannot analyse:** {err}.")
    if upload:
        item = upload_item(upload)
    elif example:
        if example not in examples:
            return PageView(markdown=f"**Cannot analyse:** unknown example {_code(example)}.")
        item = examples[example]
    else:
        return PageView(markdown="Upload an ultrasound image, or pick an example, to see the model's result.")
    result = analyse(loaded, item, pixel_size)
    row = result.row
    if not result.ok:
        return PageView(markdown=f"### Cannot analyse {_code(row.image)}\n\n{_escape(row.error)}")
    return PageView(
        markdown=result_markdown(result),
        overlay_rgb=result.overlay_rgb,
        mask_image=_mask_image(result.mask),
        truth_image=_mask_image(result.truth),
        probabilities=probabilities(row),
    )


def probabilities(row: ImageResult) -> dict[str, float]:
    return {name: float(getattr(row, f"p_{name}")) for name in CLASS_NAMES}


def _mask_image(mask: np.ndarray | None) -> np.ndarray | None:
    return None if mask is None else mask.astype(np.uint8) * 255


def _escape(text: str) -> str:
    """Markdown-neutral text (Gradio sanitises HTML; this keeps ``*`` or ``_`` in a file name literal)."""
    return "".join("\\" + ch if ch in "\\`*_[]<>#|~" else ch for ch in text)


def _code(text: str) -> str:
    return "`" + text.replace("`", "'") + "`"


def result_markdown(result: DemoResult) -> str:
    """The measurements table; its labels are what the browser test reads."""
    row = result.row
    area = f"{row.lesion_area_px:,} px²"
    if row.lesion_area_mm2 is not None:
        area += f" ({row.lesion_area_mm2:,.1f} mm²)"
    lines = [
        f"### Result for {_code(row.image)}",
        "",
        "| Measure | Value |",
        "|---|---|",
        f"| Predicted class | **{row.pred_class}** |",
        f"| Confidence | {row.confidence:.3f} |",
        f"| Lesion area | {area} |",
        f"| Lesion count | {row.lesion_count} |",
        f"| Image size | {row.width} × {row.height} px |",
    ]
    if row.true_class:
        lines.append(f"| True class | {row.true_class} |")
    if row.dice is not None:
        lines.append(f"| Dice | {row.dice:.3f} |")
        lines.append(f"| IoU | {row.iou:.3f} |")
    if row.truth_error:
        lines.append(f"| Ground truth | not used: {_escape(row.truth_error)} |")
    lines += ["", "Outline: amber = model's prediction, green = ground truth (examples only)."]
    return "\n".join(lines)


def model_markdown(card: ModelCard, sha256: str) -> str:
    """Intended use, and the model's name, version and held-out test scores from its card."""
    paragraphs = [f"**{DISCLAIMER}** Intended use (model card): {_escape(card.intended_use)}"]
    if card.test_model:
        paragraphs.append(
            "**TEST MODEL: random or barely trained weights for software tests; predictions are meaningless.**"
        )
    details = [
        f"**Model:** {_escape(card.name)}, version {_escape(card.version)} "
        f"(weights sha256 {sha256[:12]}…; busi-batch {__version__})",
        f"**Held-out test scores (model card):** {card_scores(card.metrics)}",
    ]
    if card.training_data:
        details.append(f"**Trained on:** {_escape(card.training_data)}")
    paragraphs.append("  \n".join(details))
    return "\n\n".join(paragraphs)


def card_scores(card_metrics: dict[str, Any]) -> str:
    """One line from a card's ``metrics`` (the ``metrics.json`` schema); says so when there are none."""
    parts = []
    cls = card_metrics.get("classification") or {}
    if cls.get("n_images"):
        bits = [f"{label} {cls[key]:.3f}" for key, label in
                (("accuracy", "accuracy"), ("mcc", "MCC"), ("f1_macro", "macro F1")) if cls.get(key) is not None]
        parts.append(", ".join(bits) + f" ({cls['n_images']} images)")
    seg = card_metrics.get("segmentation") or {}
    if seg.get("dice_mean") is not None:
        text = f"lesion Dice {seg['dice_mean']:.3f}"
        if seg.get("iou_mean") is not None:
            text += f", IoU {seg['iou_mean']:.3f}"
        if seg.get("n_with_lesion"):
            text += f" ({seg['n_with_lesion']} images with a lesion)"
        parts.append(text)
    return "; ".join(parts) if parts else "none recorded in the model card"


# --------------------------------------------------------------------------------------------- the page


def import_gradio() -> Any:
    """Gradio, imported only now and only after every phone-home is switched off."""
    os.environ.update(PRIVACY_ENV)
    try:
        import gradio
    except ImportError as err:
        raise DemoUnavailable(INSTALL_HINT) from err
    return gradio


class PictureFiles:
    """The page's pictures handed to Gradio as PNG files, each written whole and once per content.

    Why not arrays: Gradio saves an array output to ``cache/<content hash>/image.png`` by rewriting that file in
    place every time the same picture is shown again (an example analysed twice). A browser still fetching the
    earlier copy then gets fewer or more bytes than announced (h11: "Too much data for declared
    Content-Length") and the picture never appears. A file path goes through Gradio's file
    cache instead, which copies each file once, atomically. Files here older than ``keep_s`` are swept.
    """

    def __init__(self, root: Path, keep_s: float = 3600.0) -> None:
        self.root, self.keep_s = Path(root), keep_s
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, picture: np.ndarray | None) -> str | None:
        """A PNG file holding ``picture`` (grey, or RGB as Gradio shows it), or None for no picture."""
        if picture is None:
            return None
        pixels = cv2.cvtColor(picture, cv2.COLOR_RGB2BGR) if picture.ndim == 3 else picture
        data = encode_png(np.ascontiguousarray(pixels), compression=1)
        target = self.root / f"{hashlib.sha256(data).hexdigest()[:32]}.png"
        try:
            os.utime(target)  # shown again: young again, so the sweep below leaves it for Gradio to copy
        except FileNotFoundError:
            atomic_write_bytes(target, data)
        self._sweep()
        return str(target)

    def _sweep(self) -> None:
        cutoff = time.time() - self.keep_s
        for old in self.root.glob("*.png"):
            try:
                if old.stat().st_mtime < cutoff:
                    old.unlink()
            except OSError:  # already gone, or not ours to remove: never worth failing a page for
                pass


def build_app(
    loaded: LoadedModel, examples: dict[str, ImageItem], pixel_size_mm: float | None = None,
    pictures: PictureFiles | None = None,
) -> Any:
    """The Gradio Blocks page. Handlers only call :func:`page_view`; the layout is all that lives here.

    ``pictures``: where the shown pictures are staged (default: a temporary folder removed at exit).
    """
    gr = import_gradio()
    if pictures is None:
        staging = tempfile.TemporaryDirectory(prefix="busi-batch-demo-")
        atexit.register(staging.cleanup)
        pictures = PictureFiles(Path(staging.name))

    def show(view: PageView) -> tuple[Any, ...]:
        return (pictures.path(view.overlay_rgb), pictures.path(view.mask_image), pictures.path(view.truth_image),
                view.probabilities, view.markdown)

    def on_upload(path: str | None, px: float | None) -> tuple[Any, ...]:
        return (*show(page_view(loaded, path, None, px, examples)), None)

    def on_example(name: str | None, px: float | None) -> tuple[Any, ...]:
        return (*show(page_view(loaded, None, name, px, examples)), None)

    def on_pixel_size(path: str | None, name: str | None, px: float | None) -> tuple[Any, ...]:
        return show(page_view(loaded, path, name, px, examples))

    with gr.Blocks(title="busi-batch demo", analytics_enabled=False, delete_cache=(600, 3600)) as page:
        gr.Markdown("## busi-batch: breast ultrasound lesion segmentation and classification")
        gr.Markdown(model_markdown(loaded.card, loaded.sha256), elem_id="busi-model")
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(
                    label="Upload an ultrasound image (PNG, JPEG, BMP, TIFF)", file_types=sorted(IMAGE_SUFFIXES),
                    type="filepath", elem_id="busi-upload",
                )
                example = gr.Dropdown(
                    choices=list(examples), value=None, label="…or pick an example (with ground truth)",
                    elem_id="busi-example",
                )
                pixel = gr.Number(
                    value=pixel_size_mm, minimum=0, elem_id="busi-pixel-size",
                    label="Pixel size in mm, for the area in mm² (0 = unknown; Enter re-analyses)",
                )
                probs = gr.Label(label="Class probabilities", num_top_classes=len(CLASS_NAMES),
                                 elem_id="busi-probabilities")
                result = gr.Markdown(page_view(loaded, None, None, None, examples).markdown, elem_id="busi-result")
            with gr.Column(scale=2):
                overlay = gr.Image(label="Image with predicted outline", type="filepath", format="png",
                                   interactive=False, buttons=["download", "fullscreen"], elem_id="busi-overlay")
                with gr.Row():
                    mask = gr.Image(label="Predicted mask", type="filepath", format="png", interactive=False,
                                    buttons=["download"], elem_id="busi-mask")
                    truth = gr.Image(label="Ground-truth mask (examples)", type="filepath", format="png",
                                     interactive=False, buttons=["download"], elem_id="busi-truth")
        gr.Markdown(
            "Example images: BUSI test split (Al-Dhabyani et al., *Data in Brief* 28, 2020, "
            "doi:10.1016/j.dib.2019.104863). Uploads stay on this machine and are deleted within the hour."
        )
        outputs = [overlay, mask, truth, probs, result]
        upload.upload(on_upload, [upload, pixel], [*outputs, example])
        example.input(on_example, [example, pixel], [*outputs, upload])
        pixel.submit(on_pixel_size, [upload, example, pixel], outputs)
    return page


def launch_options(config: DemoConfig) -> dict[str, Any]:
    """``Blocks.launch`` arguments: local only, nothing public, no telemetry, no tracebacks in the page."""
    return dict(
        server_name=config.host, server_port=config.port, share=False, inbrowser=False, quiet=True,
        show_error=False, max_file_size=MAX_UPLOAD, enable_monitoring=False, ssr_mode=False, mcp_server=False,
        pwa=False, footer_links=[], prevent_thread_lock=True,
    )


def validate(config: DemoConfig) -> None:
    if not 1 <= config.port <= 65535:
        raise UsageError(f"--port must be between 1 and 65535, not {config.port}")
    if config.pixel_size_mm is not None and not config.pixel_size_mm > 0:
        raise UsageError("--pixel-size must be a positive number of millimetres")
    if not config.host.strip():
        raise UsageError("--host must not be empty")


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM ends the demo like Ctrl-C, so Gradio shuts down cleanly and sweeps its upload folder."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def serve(config: DemoConfig) -> None:
    """Load the model, serve the page until Ctrl-C / SIGTERM. Raises BusiBatchError subclasses for the CLI."""
    validate(config)
    import_gradio()  # before the model: a missing extra is reported first and fast
    device = select_device(config.device)
    loaded = load_model(config.weights, device, select_precision(config.precision, device))
    page = build_app(loaded, example_items(), config.pixel_size_mm)
    if config.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("listening on %s: anyone who can reach this machine can use the demo and see its results",
                    config.host)
    try:
        _, url, _ = page.launch(**launch_options(config))
    except OSError as err:
        raise BusiBatchError(f"cannot serve on {config.host}:{config.port}: {err}") from err
    logger.info("busi-batch demo (%s %s) serving on %s; Ctrl-C to stop. %s", loaded.card.name, loaded.card.version,
             url, DISCLAIMER)
    with _sigterm_as_interrupt():
        try:
            while page.is_running:
                time.sleep(0.2)
        except KeyboardInterrupt:
            logger.info("busi-batch demo: stopping")
        finally:
            page.close(verbose=False)
