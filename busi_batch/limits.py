"""Limits on what one input may cost, shared by every decoder (:mod:`busi_batch.imageio`, :mod:`busi_batch.dicom`)."""

#: Refuse images above this many pixels (about 12,000 x 8,300): far beyond any ultrasound frame, and small
#: enough that one decode cannot exhaust memory.
MAX_PIXELS = 100_000_000
