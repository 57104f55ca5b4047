"""busi-batch: batch lesion segmentation and classification of breast ultrasound images.

A research tool, not a diagnostic device.
"""

__version__ = "0.1.0"
