"""One options object for the API, the command line and the pipeline.

Every option is declared once, as a field of :class:`Options`, with what the
fronts need: its command-line flag and help, and whether it changes the
result (those go into the work store's fingerprint; the others only say how
the work is run). The CLI builds its arguments from these fields and the API's
keywords map onto them by name (a test checks both), so an option cannot be
added to one front and forgotten in the other or in the fingerprint.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import numbers
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np

from ..errors import InputError
from .budget import AUTO, AUTO_SHARE, DEFAULT_MEMORY_LIMIT, size_text

# how the current front spells option names in messages: 'api' or 'cli'
_FRONT = contextvars.ContextVar("p2s_front", default="api")


@contextlib.contextmanager
def front(name: str):
    """Name options the way the ``name`` front ('api' or 'cli') spells them."""
    token = _FRONT.set(name)
    try:
        yield
    finally:
        _FRONT.reset(token)


def _opt(flag=None, help="", *, result=False, metavar=None, api=True, choices=None,
         aliases=(), negative=None, switch=False):
    """Field metadata: ``flag`` and its ``aliases`` (DIPY's spellings) on the
    command line; ``switch`` for a boolean flag (``--x`` / ``--no-x``);
    ``negative`` a flag that sets it False (DIPY's ``--skip_...``)."""
    return {"flag": flag, "help": help, "result": result, "metavar": metavar,
            "api": api, "choices": choices, "aliases": tuple(aliases),
            "negative": negative, "switch": switch}


def spell(name: str) -> str:
    """The user's spelling of option ``name`` in the current front.

    >>> spell("patch_radius")
    'patch_radius'
    """
    if _FRONT.get() == "cli":
        meta = _FIELD_META.get(name)
        if meta is not None and meta["flag"]:
            return meta["flag"]
        return "--" + name.replace("_", "-")
    return name


def spell_value(name: str, value) -> str:
    """Option ``name`` set to ``value``, as the current front writes it.

    >>> spell_value("version", 3)
    'version=3'
    """
    if _FRONT.get() == "cli":
        return f"{spell(name)} {value}"
    return f"{name}={value!r}"


def is_auto(value) -> bool:
    """Whether an option's value is ``'auto'`` (any case): left to the data.

    >>> is_auto("Auto"), is_auto(1)
    (True, False)
    """
    return isinstance(value, str) and value.strip().lower() == AUTO


@dataclass(frozen=True)
class Options:
    """Everything a denoising run can be told, for every front.

    Result options (``result=True`` in the field metadata) decide the
    numbers written; run options decide only where and how the work runs.
    """

    # -- options that change the result
    patch_radius: object = field(default=0, metadata=_opt(
        "--patch-radius", "patch radius in voxels: R or RX,RY,RZ, or auto (chosen by "
        "cross-validation from 0 up to --max-patch-radius; needs --ver 1)",
        result=True, metavar="R", aliases=("--patch_radius",)))
    # changes the result only with patch_radius 'auto' (see result_fields)
    max_patch_radius: object = field(default=1, metadata=_opt(
        "--max-patch-radius", "the largest radius --patch-radius auto scores: R or "
        "RX,RY,RZ", result=True, metavar="R"))
    model: str = field(default="ols", metadata=_opt(
        "--model", "ols, ridge or lasso", result=True))
    b0_threshold: float = field(default=50, metadata=_opt(
        "--b0-threshold", "b-values up to this are b0 volumes",
        result=True, aliases=("--b0_threshold",)))
    out_dtype: object = field(default=None, metadata=_opt(
        "--out-dtype", "output dtype (default: the input's)", result=True,
        aliases=("--out_dtype",)))
    alpha: object = field(default=1.0, metadata=_opt(
        "--alpha", "penalty of ridge and lasso, or auto (ridge: chosen by cross-validation)",
        result=True))
    b0_denoising: bool = field(default=True, metadata=_opt(
        "--b0-denoising", "denoise the b0 volumes", result=True,
        switch=True, negative="--skip_b0_denoising"))
    clip_negative_vals: bool = field(default=False, metadata=_opt(
        "--clip-negative-vals", "clip negative values to 0",
        result=True, switch=True, aliases=("--clip_negative_vals",)))
    shift_intensity: bool = field(default=True, metadata=_opt(
        "--shift-intensity", "shift each volume to its original minimum "
        "", result=True, switch=True,
        negative="--skip_shift_intensity"))
    version: int = field(default=3, metadata=_opt(
        "--ver", "DIPY's algorithm version, 1 or 3; both are exact here "
        "", result=True, choices=(1, 3)))
    groups: object = field(default=None, metadata=_opt(
        "--groups", "volumes regressed together: 'shell' (one group per shell), "
        "'batch:N' (diffusion volumes in batches of N), or a file of one integer label "
        "per volume (negative: passed through) (default: b0 and the rest)",
        result=True, metavar="SPEC"))
    mask: object = field(default=None, metadata=_opt(
        "--mask", "NIfTI mask: fit on these voxels only (default: all voxels)",
        result=True))
    precision: str = field(default="auto", metadata=_opt(
        "--precision", "arithmetic of the prediction: auto (float32 when the input and "
        "output fit it exactly, as DIPY), float32 or float64",
        result=True, choices=("auto", "float32", "float64")))
    # the chunk grid changes float rounding, so it is part of a run's identity
    # (recorded there from the plan), but the user's hint itself is not
    chunks: object = field(default=None, metadata=_opt(
        "--chunks", "spatial chunk shape X,Y,Z (default: from the memory budget)",
        metavar="X,Y,Z"))
    # -- options that say how the work runs
    memory_limit: object = field(default=AUTO, metadata=_opt(
        "--memory-limit", "memory budget of a local run, shared by its workers; on a "
        "cluster each worker's own limit rules, this one for workers without one "
        f"(default: auto, {AUTO_SHARE * 100:.0f}%% of the memory this process may use, the "
        f"smaller of the machine's RAM and its cgroup limit; here "
        f"{size_text(DEFAULT_MEMORY_LIMIT)})",
        api=False))
    workers: object = field(default=None, metadata=_opt(
        "--workers", "local worker processes (default: threads in this process)",
        api=False))
    threads: object = field(default=None, metadata=_opt(
        "--threads", "threads per worker (default: the usable cores)", api=False))
    scheduler: object = field(default=None, metadata=_opt(
        "--scheduler", "address of a Dask scheduler (default: --scheduler-file, "
        "$P2S_DASK_SCHEDULER, $DASK_SCHEDULER_ADDRESS or Dask's config; else a local run)", api=False,
        metavar="ADDRESS"))
    scheduler_file: object = field(default=None, metadata=_opt(
        "--scheduler-file", "a Dask scheduler file to connect to (default: none)",
        api=False,
        metavar="FILE"))
    overwrite: bool = field(default=False, metadata=_opt(
        "--overwrite", "replace an existing OUT (never done otherwise)", api=False, switch=True, aliases=("--force",)))
    tmp_dir: object = field(default=None, metadata=_opt(
        "--tmp-dir", "where the work store and scratch files go (default: next to OUT)"))
    storage_options: object = field(default=None, metadata=_opt(
        "--storage-options", "fsspec options for s3:// or gs:// URLs, as JSON (default: none; the usual AWS "
        "variables apply)",
        api=False, metavar="JSON"))
    log_level: str = field(default="WARNING", metadata=_opt(
        "--log-level", "how much the log says", api=False,
        aliases=("--log_level",), choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")))
    log_file: object = field(default=None, metadata=_opt(
        "--log-file", "also write the log to this file (default: stderr only)", api=False,
        aliases=("--log_file",), metavar="FILE"))
    progress: bool = field(default=True, metadata=_opt(None, "show progress", api=False))
    # what the output's sidecar names as its Sources: set by a front that
    # knows better than IN's path (BIDS URIs of a BIDS run); never a result
    # option, so the same output named from elsewhere is still done
    sources: object = field(default=None, metadata=_opt(
        None, "the output's Sources (default: IN)", api=False))
    # DIPY main's keyword: how DIPY forms its normal equations; ours always
    # come from the statistics, so the result does not depend on it
    gram: object = field(default=None, metadata=_opt(None, "accepted for DIPY"))

    def result_fields(self) -> dict:
        """The options that change the result, as plain JSON values."""
        out = {}
        for f in fields(self):
            if not f.metadata["result"]:
                continue
            value = getattr(self, f.name)
            if f.name == "out_dtype" and value is not None:
                value = str(np.dtype(value))
            elif f.name == "patch_radius" and not is_auto(value):
                value = [int(v) for v in np.atleast_1d(value)]
            elif f.name == "max_patch_radius":
                if not is_auto(self.patch_radius):
                    continue  # no choice to bound: earlier fingerprints stay valid
                value = [int(v) for v in np.atleast_1d(value)]
            elif f.name == "groups" and value is not None and not isinstance(value, str):
                value = [int(v) for v in np.asarray(value).ravel()]
            elif f.name == "mask" and value is not None and not isinstance(value, str):
                value = "<array>"  # arrays are fingerprinted by content elsewhere
            out[f.name] = value
        return out

    def with_(self, **changes) -> "Options":
        """A copy with ``changes``."""
        return replace(self, **changes)

    def as_dict(self) -> dict:
        return asdict(self)


_FIELD_META = {f.name: f.metadata for f in fields(Options)}


def option_fields(*, cli=None, api=None, result=None):
    """The fields of :class:`Options`, filtered by front or kind."""
    out = []
    for f in fields(Options):
        m = f.metadata
        if cli is not None and bool(m["flag"]) != cli:
            continue
        if api is not None and m["api"] != api:
            continue
        if result is not None and m["result"] != result:
            continue
        out.append(f)
    return out


def check_run_options(opts: Options) -> None:
    """Refuse run options that cannot work (one line naming the option)."""
    for name in ("workers", "threads"):
        value = getattr(opts, name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise InputError(f"{spell(name)} must be a positive integer; got {value!r}")
    threshold = opts.b0_threshold
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) \
            or not math.isfinite(threshold):
        raise InputError(f"{spell('b0_threshold')} must be a finite number; got {threshold!r}")
    _check_budget(opts)
    # the writers' dtypes are checked here, before any file is touched: the
    # in-memory API may return others (check_options' rule)
    from .validate import check_out_dtype
    check_out_dtype(opts.out_dtype, stored=True)


def _check_budget(opts: Options) -> None:
    """The budget parses and is workable; so is each local worker's share
    of it (there is no share when a scheduler runs the work)."""
    from .budget import check_worker_share, parse_memory_limit
    parse_memory_limit(opts.memory_limit)
    if opts.workers in (None, 1):
        return
    from ..run.executors import resolve_scheduler
    if resolve_scheduler(opts.scheduler, opts.scheduler_file) is None:
        check_worker_share(opts.memory_limit, opts.workers)
