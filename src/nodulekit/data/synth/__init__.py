"""Synthetic chest CT with lung nodules, written in the LUNA16 layout.

``generate_scan(seed, index)`` renders one scan (volume, label mask, nodules, candidates);
``generate_dataset(out_dir, n_scans, seed)`` writes a whole dataset. See ``docs/synthetic.md``.
"""

from nodulekit.data.synth.dataset import generate_dataset
from nodulekit.data.synth.nodules import Nodule
from nodulekit.data.synth.scan import SyntheticScan, generate_scan, series_uid

__all__ = ["Nodule", "SyntheticScan", "generate_dataset", "generate_scan", "series_uid"]
