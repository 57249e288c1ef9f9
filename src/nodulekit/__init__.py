"""nodulekit: lung-nodule detection for chest CT, compressed for RK3588 NPUs and CPUs.

The package follows the data flow: ``data -> models -> train -> optimize -> deploy ->
detect -> evaluate -> report``. ``nodulekit.cli`` is a thin layer over these modules.
"""

__version__ = "0.1.0"

HU_MIN = -1000.0
HU_MAX = 1000.0
CONTEXT_SLICES = 3  # slices above and below the centre slice: 7 input channels
SEG_CHANNELS = 2 * CONTEXT_SLICES + 1
CLS_CROP = (32, 48, 48)  # (index, row, col) crop around a candidate for the classifier
CLS_THRESHOLD = 0.5  # classifier probability from which a candidate is reported as a nodule
SEG_THRESHOLD = 0.5  # segmentation probability from which a pixel is marked (candidates, pixel metrics)
VAL_FRACTION = 0.25  # share of scans held out, by uid hash, when no split file is given
