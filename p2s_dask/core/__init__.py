"""The numerical core: plain NumPy/SciPy, no Dask and no I/O."""

from .patches import normalize_radius, patch_offsets, patch_size, features
from .predict import predict_block
from .solve import MODELS, LinearModel, fit, fit_direct, fit_lasso, fit_ridge
from .stats import Stats, block_stats, merge, merge_all, rows_stats

__all__ = [
    "MODELS", "LinearModel", "Stats", "block_stats", "features", "fit",
    "fit_direct", "fit_lasso", "fit_ridge", "merge", "merge_all",
    "normalize_radius", "patch_offsets", "patch_size", "predict_block",
    "rows_stats",
]
