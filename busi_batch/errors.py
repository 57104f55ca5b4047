"""busi-batch's own small exception hierarchy.

The CLI turns each into one line on stderr and an exit code; anything else is a bug and keeps its traceback.
"""


class BusiBatchError(Exception):
    """Base class: a fatal, explainable problem (exit code 1)."""


class UsageError(BusiBatchError):
    """The command line asks for something impossible (exit code 2)."""


class RunInterrupted(BusiBatchError):
    """SIGTERM or Ctrl-C: the run stopped after the current batch and saved what was done (exit code 4)."""


class OutputFolderRefused(BusiBatchError):
    """The output folder is not busi-batch's to write into, or holds results this run would replace (exit code 5).

    Nothing has been written into the folder.
    """


class EmptyStudy(BusiBatchError):
    """The study holds no image busi-batch can read (none at all, or only unsupported files) (exit code 6)."""


class ModelLoadError(BusiBatchError):
    """A checkpoint or its model card is missing, tampered with or incompatible."""


class ImageDecodeError(Exception):
    """One input file cannot be read as an image; the run records it and goes on.

    Not a BusiBatchError on purpose: it never ends a run.
    """


class OutputWriteError(BusiBatchError):
    """Writing into the output folder failed (disk full, permissions): fatal, nothing partial is left."""


class DecodingWorkerDied(RuntimeError):
    """A decoding worker process ended mid-run (killed by a signal or the OOM killer, or exited): the batches it
    held never come.

    Raised by the iteration of ``inference.predict`` (``loader``), or wherever the main thread is when PyTorch's
    SIGCHLD watch sees the death first. Not a BusiBatchError: the caller decides what it means for a run. A
    RuntimeError, as PyTorch's own report of a dead worker is; the message starts with "DataLoader worker".
    """
