"""Training, calibration, evaluation and export of the BUSI multi-task U-Net (not part of the installed package).

Every module runs as ``python -m train.X`` from the repository root and reuses ``busi_batch`` for discovery,
decoding, preprocessing, the network, inference and metrics, so training sees exactly what ``run`` sees.
"""

import os

# albumentations checks PyPI for a newer version on import; the machines this runs on have no network.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
