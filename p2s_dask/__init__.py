"""Exact, out-of-core Patch2Self denoising of diffusion MRI on Dask."""

# dask looks for distributed at every compute; importing it here once keeps
# that out of the first call.
import distributed  # noqa: F401

from .api import patch2self
from .errors import InputError

__version__ = "0.1.0"
__all__ = ["InputError", "patch2self", "__version__"]
