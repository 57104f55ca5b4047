"""The run report: a summary and one page per image, as HTML or PDF, rendered from a finished output folder.

A report is a function of the run folder alone (``run.json``, ``predictions.csv``, ``metrics.json``,
``ground_truth.json``, the masks) and of the input images at the paths the run recorded; it never loads the
model, so ``busi-batch report RUN_DIR`` re-renders a report long after the run.

Modules, one concern each:

* :mod:`.content`: what the report says (flags, counts, histograms, galleries, charts), pure functions of the
  run's records;
* :mod:`.assets`: the pictures, downscaled JPEGs written to ``OUT/report_assets``;
* :mod:`.render`: the run folder read back, the Jinja2 templates filled, HTML written;
* :mod:`.pdf`: WeasyPrint in chunks across worker processes, page numbering, the merge into one PDF.
"""

from .content import PAGE_CHOICES
from .render import ReportResult, load_run, render_report, report_format, validate_report_options

__all__ = ["PAGE_CHOICES", "ReportResult", "load_run", "render_report", "report_format", "validate_report_options"]
