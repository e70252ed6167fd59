"""Which volumes are regressed on which: b0 and DWI groups, or explicit groups."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ..errors import InputError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Group:
    """Volumes denoised together; ``denoise=False`` passes them through."""

    name: str
    indices: tuple[int, ...]
    denoise: bool = True


def make_groups(bvals, n_volumes: int, *, b0_threshold=50, b0_denoising=True,
                groups=None) -> list[Group]:
    """Split the volumes into the groups Patch2Self regresses separately.

    Parameters
    ----------
    bvals : array-like (n_volumes,)
    n_volumes : int
    b0_threshold : float
        Volumes with ``bval <= b0_threshold`` form the b0 group.
    b0_denoising : bool
        If False the b0 group is passed through unchanged.
    groups : array-like (n_volumes,) of int, optional
        An explicit label per volume (e.g. a shell index, or batches of a
        long acquisition); volumes with the same label are regressed on each
        other, and a negative label passes a volume through. Replaces the
        b0 / DWI split.

    Returns
    -------
    list of Group
        Groups of one volume are passed through. As in DIPY, which skips a
        single b0 silently (a line in its log when verbose), this is not a
        warning: one line goes to the ``p2s_dask`` log, at INFO.
    """
    if groups is not None:
        labels = np.asarray(groups)
        if labels.shape != (n_volumes,) or not np.issubdtype(labels.dtype, np.integer):
            raise InputError(
                f"groups must be {n_volumes} integer labels, one per volume; "
                f"got shape {labels.shape} of {labels.dtype}"
            )
        out = []
        for label in np.unique(labels):
            idx = tuple(int(i) for i in np.flatnonzero(labels == label))
            out.append(Group(f"group {label}", idx, denoise=bool(label >= 0)))
    else:
        bvals = np.asarray(bvals, dtype=np.float64).ravel()
        is_b0 = bvals <= b0_threshold
        out = []
        b0 = tuple(int(i) for i in np.flatnonzero(is_b0))
        dwi = tuple(int(i) for i in np.flatnonzero(~is_b0))
        if b0:
            out.append(Group("b0", b0, denoise=bool(b0_denoising)))
        if dwi:
            out.append(Group("dwi", dwi))
    checked = []
    for g in out:
        if g.denoise and len(g.indices) < 2:
            logger.info("%s denoising skipped: the %s group has a single volume (index "
                        "%d), which cannot be regressed on other volumes; passed "
                        "through unchanged", g.name, g.name, g.indices[0])
            g = Group(g.name, g.indices, denoise=False)
        elif not g.denoise:
            logger.info("%s denoising skipped: its %d volume(s) are passed through "
                        "unchanged", g.name, len(g.indices))
        checked.append(g)
    return checked
