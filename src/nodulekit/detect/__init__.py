"""Detection app: CT scans in, nodule candidates with probabilities, a table and PNGs out."""

from nodulekit.detect.pipeline import detect_scan, run_detection

__all__ = ["detect_scan", "run_detection"]
