"""The ``p2s-dask`` command: convert, denoise, demo."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import warnings

from ..errors import InputError
from ..io.malloc import one_heap
from .logs import attached

def _ints(text, flag):
    try:
        return [int(p) for p in text.replace("x", ",").split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{flag} takes integers; got {text!r}") from None


def _chunks(text):
    parts = _ints(text, "--chunks")
    if len(parts) != 3 or min(parts) < 1:
        raise argparse.ArgumentTypeError("--chunks takes three positive ints, e.g. 64,64,16")
    return tuple(parts)


def _radius(text, flag="--patch-radius", auto=True):
    """R, RX,RY,RZ or (``auto``) the word 'auto'."""
    if auto and text.strip().lower() == "auto":
        return "auto"
    parts = _ints(text, flag)
    if len(parts) not in (1, 3):
        also = ", or auto" if auto else ""
        raise argparse.ArgumentTypeError(f"{flag} takes 1 or 3 ints, e.g. 1 or 1,1,0{also}")
    return parts[0] if len(parts) == 1 else tuple(parts)


def _max_radius(text):
    return _radius(text, "--max-patch-radius", auto=False)


def _alpha(text):
    """A number, or 'auto' (ridge's penalty chosen by cross-validation)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--alpha takes a number or auto; got {text!r}") \
            from None


def _storage(text):
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"--storage-options is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("--storage-options must be a JSON object")
    return value


# how each option's text becomes a value (default: the text itself)
_PARSERS = {
    "patch_radius": _radius, "max_patch_radius": _max_radius, "alpha": _alpha,
    "b0_threshold": float, "version": int,
    "chunks": _chunks, "storage_options": _storage, "workers": int, "threads": int,
    "log_level": str.upper,
}
# options of both subcommands (the rest are denoise's)
_COMMON = ("memory_limit", "storage_options", "overwrite", "tmp_dir", "log_level", "log_file")


def _add_option(p, f):
    """The arguments of one field of :class:`Options`: its flag, DIPY's
    spellings of it, and for a switch ``--no-X`` or DIPY's ``--skip_X``."""
    meta = f.metadata
    flags = (meta["flag"], *meta["aliases"])
    kwargs = {"default": f.default, "help": meta["help"], "dest": f.name}
    if meta["switch"]:
        action = argparse.BooleanOptionalAction if f.default else "store_true"
        p.add_argument(*flags, action=action, **kwargs)
    else:
        kwargs["type"] = _PARSERS.get(f.name, str)
        for key in ("metavar", "choices"):
            if meta[key]:
                kwargs[key] = meta[key]
        p.add_argument(*flags, **kwargs)
    if meta["negative"]:
        p.add_argument(meta["negative"], dest=f.name, action="store_false",
                       help=f"same as --no-{meta['flag'][2:]} (DIPY's spelling; default: not given)")


class _Help(argparse.HelpFormatter):
    """Every option's default in ``--help``, unless its text already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        quiet = (argparse._HelpAction, argparse._VersionAction, argparse._StoreFalseAction)
        if "default" in text or action.default in (argparse.SUPPRESS, None) \
                or not action.option_strings or isinstance(action, quiet):
            return text
        return f"{text} (default: %(default)s)"


def _options_args(p, names=None):
    from ..config.options import option_fields
    for f in option_fields(cli=True):
        if names is None or f.name in names:
            _add_option(p, f)
    p.add_argument("--quiet", action="store_true", help="no progress")


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (``p2s-dask: error: ...``, exit code 2); no
    abbreviations: a prefix never silently means another option
    (``--report`` is not ``--report-json``)."""

    def __init__(self, *args, **kwargs):
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise InputError(message)


def _add_bids(sub):
    """The ``bids`` subcommand (a BIDS App's arguments, then denoise's options)."""
    bids = sub.add_parser("bids", help="BIDS App: denoise every DWI run of a dataset",
                          formatter_class=_Help)
    bids.add_argument("bids_dir", metavar="BIDS_DIR")
    bids.add_argument("output_dir", metavar="OUTPUT_DIR")
    bids.add_argument("analysis_level", choices=("participant",))
    bids.add_argument("--participant-label", "--participant_label", nargs="+", default=None,
                      metavar="LABEL", help="only these subjects (default: all)")
    bids.add_argument("--session-label", "--session_label", nargs="+", default=None,
                      metavar="LABEL", help="only these sessions (default: all)")
    bids.add_argument("--bvals", default=None,
                      help="FSL bvals for the runs the dataset gives none; the dataset's "
                           "win: a run's own .bval, else the nearest inherited one "
                           "(sub-XX/ses-YY/, sub-XX/, or dwi.bval at the top) "
                           "(default: none)")
    bids.add_argument("--bvecs", default=None,
                      help="FSL bvecs for the runs the dataset gives none, as --bvals "
                           "(default: none)")
    bids.add_argument("--dry-run", action="store_true",
                      help="print the plan of every run and every path, then exit")
    bids.add_argument("--no-report", dest="report", action="store_false",
                      help="no QC report (by default one page per subject, "
                           "OUTPUT_DIR/sub-XX.html, with its figures under "
                           "OUTPUT_DIR/sub-XX/figures/, and each run's noise map beside "
                           "its output)")
    _options_args(bids)


def build_parser() -> argparse.ArgumentParser:
    """The ``p2s-dask`` parser; denoise's options come from :class:`Options`."""
    from .. import __version__
    parser = _Parser(
        prog="p2s-dask", formatter_class=_Help,
        description="Exact, out-of-core Patch2Self denoising of diffusion MRI.")
    parser.add_argument("--version", action="version", version=f"p2s-dask {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    conv = sub.add_parser("convert", help="NIfTI <-> NIfTI-Zarr store (chosen by the names)",
                          formatter_class=_Help)
    conv.add_argument("input", metavar="IN")
    conv.add_argument("output", metavar="OUT")
    conv.add_argument("--bvals", default=None,
                      help="FSL bvals to store (default: IN's .bval sibling, if any)")
    conv.add_argument("--bvecs", default=None,
                      help="FSL bvecs to store (default: IN's .bvec sibling, if any)")
    _options_args(conv, _COMMON + ("chunks",))

    den = sub.add_parser("denoise", help="denoise IN into OUT (each NIfTI or Zarr)",
                         formatter_class=_Help,
                         usage="%(prog)s [options] IN OUT | IN [IN ...] --out-dir DIR")
    den.add_argument("paths", nargs="+", metavar="PATH",
                     help="IN OUT, or with --out-dir one or more IN (globs allowed)")
    den.add_argument("--out-dir", default=None, metavar="DIR",
                     help="write each IN's output here, under IN's name (default: none)")
    den.add_argument("--bvals", default=None,
                     help="FSL bvals (default: stored in a Zarr IN, or IN's .bval sibling)")
    den.add_argument("--bvecs", default=None,
                     help="FSL bvecs (default: stored in a Zarr IN, or IN's .bvec sibling)")
    den.add_argument("--report-json", default=None, metavar="FILE",
                     help="also write the run's timings and peak memory as JSON "
                          "(default: none)")
    den.add_argument("--report", default=None, metavar="FILE",
                     help="also write a QC report (one self-contained HTML page: mosaics, "
                          "noise map, residuals per volume and slice with outlying volumes "
                          "flagged, histogram, the run) and OUT's noise map beside OUT "
                          "(OUT without its extension + _noise.nii.gz) (default: none)")
    den.add_argument("--dry-run", action="store_true",
                     help="print the plan (passes, chunks, memory, modes) and every path "
                          "the run would read or write, then exit")
    _options_args(den)

    _add_bids(sub)

    demo = sub.add_parser("demo", help="denoise the bundled example data",
                          formatter_class=_Help)
    demo.add_argument("--out-dir", default="p2s_demo",
                      help="where to write the result and figure (default %(default)s)")
    demo.add_argument("--overwrite", action="store_true")
    demo.add_argument("--quiet", action="store_true")
    return parser


def _convert(args):
    from ..io import kind_of, nifti_to_zarr
    src, dst = kind_of(args.input), kind_of(args.output)
    _check_convert_paths(args)
    common = dict(memory_limit=args.memory_limit, overwrite=args.overwrite,
                  storage_options=args.storage_options, tmp_dir=args.tmp_dir,
                  progress=not args.quiet)
    with _log_file(args):
        if src == "nifti" and dst == "zarr":
            nifti_to_zarr(args.input, args.output, chunks=args.chunks, bvals=args.bvals,
                          bvecs=args.bvecs, **common)
        elif src == "zarr" and dst == "nifti":
            _convert_to_nifti(args, common)
        else:
            raise InputError(f"convert goes from NIfTI to Zarr or back; got {src} -> {dst}")
    print(f"p2s-dask: wrote {args.output}")


def _check_convert_paths(args):
    """convert's manifest: IN (with its sidecars and gradient files) read;
    OUT (with its sidecars, for a NIfTI), --tmp-dir and --log-file written."""
    from ..planning.checker import check_layout
    from ..planning.manifest import How, Manifest, Place, Write
    from ..planning.paths import front_manifest, input_reads, sidecars_of, tmp_manifest
    reads = input_reads(args.input, bvals=args.bvals, bvecs=args.bvecs)
    writes = [Write("output", Place.of(args.output), How.CREATE, flag="OUT")]
    writes += [Write("sidecar", Place.of(u), How.CREATE, flag="OUT's sidecar")
               for u in sidecars_of(args.output)]
    manifest = Manifest(tuple(reads), tuple(writes)) + tmp_manifest(args.tmp_dir) \
        + front_manifest(log_file=args.log_file)
    # an existing OUT is the converters' to judge (they resume their own work)
    check_layout(manifest)


def _convert_to_nifti(args, common):
    """A store back to NIfTI, with the gradients it holds as .bval/.bvec."""
    from ..io import zarr_to_nifti
    from ..io.sidecars import sidecar_urls, write_sidecars
    from ..io.urls import exists
    from ..io.zarr_store import probe_store
    # any store denoise reads: ours, or another tool's OME-Zarr / NIfTI-Zarr image
    _, meta, _ = probe_store(args.input, args.storage_options)
    urls = sidecar_urls(args.output)
    wanted = [urls[".bval"]] * (meta.bvals is not None) + [urls[".bvec"]] * (meta.bvecs is not None) \
        + [urls[".json"]] * (meta.sidecar is not None)
    taken = [u for u in wanted if exists(u, args.storage_options)]
    if taken and not args.overwrite:
        raise InputError(f"{taken[0]} exists; use --overwrite to replace it")
    zarr_to_nifti(args.input, args.output, **common)
    write_sidecars(args.output, bvals=meta.bvals, bvecs=meta.bvecs, metadata=meta.sidecar,
                   storage_options=args.storage_options)


def _options_of(args):
    from ..config.options import Options, option_fields
    values = {f.name: getattr(args, f.name) for f in option_fields(cli=True)}
    return Options(**values, progress=not args.quiet)


def _expand(paths) -> list:
    """Inputs with local globs expanded (a shell may not have done it)."""
    import glob
    out = []
    for p in paths:
        if any(c in p for c in "*?[") and "://" not in p:
            found = sorted(glob.glob(p))
            if not found:
                raise InputError(f"no input matches {p}")
            out.extend(found)
        else:
            out.append(p)
    return out


def _denoise(args):
    opts = _options_of(args)
    if args.out_dir is None:
        if len(args.paths) != 2:
            raise InputError("denoise takes IN OUT, or inputs with --out-dir DIR")
        return _denoise_one(args, opts, *args.paths)
    if args.report_json:
        raise InputError("--report-json is for one run (IN OUT)")
    if args.report:
        raise InputError("--report is for one run (IN OUT); p2s-dask bids writes one page "
                         "per subject")
    from ..io.urls import join
    from ..planning.paths import folders_between, front_manifest
    pairs = [(p, join(args.out_dir, os.path.basename(p.rstrip("/"))))
             for p in _expand(args.paths)]
    extra = folders_between(args.out_dir, args.out_dir, flag="--out-dir") \
        + front_manifest(log_file=args.log_file)
    return _run_many(args, opts, pairs, extra)


def _denoise_one(args, opts, inp, out):
    from ..planning.checker import check
    from ..planning.paths import (QC_PAGE, front_manifest, noise_map_url, report_manifest,
                                  run_manifest)
    from ..run.pipeline import denoise_file, describe_run, unfinished_work
    from ..run.targets import put_text
    manifest = run_manifest(inp, out, opts, bvals=args.bvals, bvecs=args.bvecs) \
        + front_manifest(report_json=args.report_json, log_file=args.log_file)
    if args.report:
        manifest += report_manifest(inp, noise=noise_map_url(out), pages=[args.report],
                                    matplotlib=_matplotlib_dir(opts))
    check(manifest, overwrite=opts.overwrite, ours=lambda: unfinished_work(out, opts),
          storage_options=opts.storage_options)
    if args.dry_run:
        return _dry_run(args, opts, [(inp, out)], manifest)
    with warnings.catch_warnings():
        # validated once more, with its warnings, by the run itself: here
        # only so that nothing (not even the log) is written for bad input
        warnings.simplefilter("ignore")
        describe_run(inp, out, args.bvals, args.bvecs, opts)
    with _log_file(args):
        report = denoise_file(inp, out, bvals=args.bvals, bvecs=args.bvecs, options=opts,
                              manifest=manifest)
        if report.resumed:
            print(f"p2s-dask: resumed from earlier work: {', '.join(report.resumed)}")
        if report.cross_validation is not None:
            from ..run.auto import choice_line
            print(f"p2s-dask: {choice_line(report.cross_validation)}")
        print(report.summary_line())
        for target in manifest.targets("report"):
            put_text(target, json.dumps(report.as_dict(), indent=1) + "\n",
                     opts.storage_options)
        for target in manifest.targets(QC_PAGE):
            from ..report import single_page
            put_text(target, single_page(report.as_dict(), report.qc, report.drawing),
                     opts.storage_options)


def _run_many(args, opts, pairs, extra, before=None, after=None, ours=frozenset()) -> int:
    """A batch: decided and checked as a whole, then run; ``before(manifest)``
    writes the front's own files once the check passed, ``after(manifest,
    outcomes)`` those that follow from the runs (``ours``: keys of the front's
    existing targets it may replace)."""
    from ..run.pipeline import checked_options
    from .batch import denoise_many, plan_batch, table
    checked_options(opts)  # one bad option fails the batch, not each run
    bvals, bvecs = getattr(args, "bvals", None), getattr(args, "bvecs", None)
    jobs, manifest = plan_batch(pairs, opts, bvals=bvals, bvecs=bvecs, extra=extra,
                                ours=ours)
    if args.dry_run:
        return _dry_run(args, opts, [(j.inp, j.out, j.pair.bvals, j.pair.bvecs)
                                     for j in jobs if j.todo == "run"], manifest)
    with _log_file(args):
        # a batch whose every run failed before it started writes nothing
        if before is not None and any(j.todo != "fail" for j in jobs):
            before(manifest)
        outcomes = denoise_many(jobs, manifest, opts)
        if after is not None:
            after(manifest, outcomes)
    print(table(outcomes))
    return 2 if any(o.status == "failed" for o in outcomes) else 0


def _bids(args):
    from .bids import bids_manifest, find_dwi_runs, keep_description, run_pair
    from ..planning.paths import front_manifest
    opts = _options_of(args)
    runs = find_dwi_runs(args.bids_dir, args.output_dir, args.participant_label,
                         args.session_label, opts.storage_options)
    if not runs:
        raise InputError(f"no DWI runs found in {args.bids_dir}")
    keep = keep_description(args.output_dir, args.bids_dir, opts.storage_options)
    extra = bids_manifest(runs, args.output_dir, keep_description=keep) \
        + front_manifest(log_file=args.log_file)
    report, after, ours = _bids_report(args, runs, opts)

    def describe(manifest):
        from ..run.targets import make_folders, put_text
        from .bids import dataset_description
        make_folders(manifest)
        for target in manifest.targets("description"):
            put_text(target, json.dumps(dataset_description(args.bids_dir), indent=2) + "\n",
                     opts.storage_options)

    pairs = [run_pair(r, args.bvals, args.bvecs) for r in runs]
    return _run_many(args, opts, pairs, extra + report, describe, after, ours)


def _matplotlib_dir(opts) -> str:
    """Where matplotlib keeps its caches while the report is drawn (a
    target of the manifest: see :func:`~p2s_dask.planning.paths.matplotlib_dir`),
    set for the matplotlib this process has not imported yet."""
    from ..planning.paths import matplotlib_dir
    folder = matplotlib_dir(opts.tmp_dir)
    os.environ["MPLCONFIGDIR"] = folder
    return folder


def _bids_report(args, runs, opts):
    """The QC report of ``bids``: its targets, the writer of the subjects'
    pages, and the targets it may replace (all of them, in a derivative
    dataset of ours: its reports are made again with their runs)."""
    from ..io.urls import exists
    from ..planning.manifest import Manifest
    from .bids import description_url, report_targets, subject_pages
    if not args.report:
        return Manifest(), None, frozenset()
    report = report_targets(runs, args.output_dir, _matplotlib_dir(opts))
    # an existing description has been found ours (it would have stopped us)
    ours = frozenset(w.place.key for w in report.writes) \
        if exists(description_url(args.output_dir), opts.storage_options) else frozenset()

    def after(manifest, outcomes):
        subject_pages(runs, args.output_dir, outcomes, manifest, opts.storage_options)
    return report, after, ours


def _dry_run(args, opts, pairs, manifest) -> int:
    """``--dry-run``: each run's plan, then the manifest; nothing is written."""
    from ..run.pipeline import dry_run_lines
    for inp, out, *gradients in pairs:  # a batch's runs bring their own gradients
        bvals, bvecs = gradients or (getattr(args, "bvals", None), getattr(args, "bvecs", None))
        for line in dry_run_lines(inp, out, opts, bvals, bvecs):
            print(line)
    for line in manifest.lines():
        print(line)
    return 0


def _demo(args):
    from .demo import run_demo
    run_demo(args.out_dir, overwrite=args.overwrite, progress=not args.quiet)


def _one_line_warning(message, category, filename, lineno, line=None):
    return f"p2s-dask: warning: {message}\n"


class _LineFormatter(logging.Formatter):
    """``p2s-dask: warning: ...`` for warnings and errors, ``p2s-dask: ...``
    for information, as the command's other lines."""

    def format(self, record):
        level = "" if record.levelno < logging.WARNING else record.levelname.lower() + ": "
        return f"p2s-dask: {level}{record.getMessage()}"


def _logging(args):
    """The 'p2s_dask' log to stderr, one line per message."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LineFormatter())
    return attached(handler, getattr(args, "log_level", "WARNING"))


def _log_file(args):
    """Also the log to ``--log-file``: opened only once the manifest that
    names it was checked (it is never an input, nor another target)."""
    path = getattr(args, "log_file", None)
    if not path:
        return contextlib.nullcontext()
    try:
        handler = logging.FileHandler(path)
    except OSError as exc:
        raise InputError(f"--log-file {path}: {exc.strerror}") from None
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    return attached(handler)


def _in_cli_words(exc: InputError) -> str:
    from ..errors import OutputExistsError
    if isinstance(exc, OutputExistsError):
        return f"{exc}; use --overwrite to replace it"
    return str(exc)


def main(argv=None) -> int:
    """Entry point of the ``p2s-dask`` console script."""
    # before any task thread exists: the memory budget holds only if
    # every thread's freed blocks are reusable by the others
    one_heap()
    # users of the command want the warning, not the line of our code
    warnings.formatwarning = _one_line_warning
    # a failed storage request can leave background tasks of the storage
    # library failing too: the run reports the failure in one line, and
    # asyncio's "exception was never retrieved" would add a traceback
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    try:
        args = build_parser().parse_args(argv)
    except InputError as exc:
        print(f"p2s-dask: error: {exc} (see p2s-dask --help)", file=sys.stderr)
        return 2
    handlers = {"convert": _convert, "denoise": _denoise, "demo": _demo, "bids": _bids}
    from ..config.options import front
    try:
        with front("cli"), _logging(args):
            code = handlers[args.command](args)
    except InputError as exc:
        print(f"p2s-dask: error: {_in_cli_words(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("p2s-dask: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
