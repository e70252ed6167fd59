"""The ``p2s-dask`` command: convert, denoise, demo."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings

from .errors import InputError

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


def _radius(text):
    parts = _ints(text, "--patch-radius")
    if len(parts) not in (1, 3):
        raise argparse.ArgumentTypeError("--patch-radius takes 1 or 3 ints, e.g. 1 or 1,1,0")
    return parts[0] if len(parts) == 1 else tuple(parts)


def _storage(text):
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"--storage-options is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("--storage-options must be a JSON object")
    return value


def _bool(text):
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


# how each option's text becomes a value (default: the text itself)
_PARSERS = {
    "patch_radius": _radius, "alpha": float, "b0_threshold": float, "version": int,
    "b0_denoising": _bool, "clip_negative_vals": _bool, "shift_intensity": _bool,
    "chunks": _chunks, "storage_options": _storage, "workers": int, "threads": int,
}
# options of both subcommands (the rest are denoise's)
_COMMON = ("memory_limit", "storage_options", "overwrite", "tmp_dir")


def _add_option(p, f):
    """One argument of the parser from one field of :class:`Options`."""
    meta = f.metadata
    kwargs = {"default": f.default, "help": meta["help"], "dest": f.name}
    if f.type in ("bool", bool) and meta["metavar"] is None:
        kwargs["action"] = "store_true"
    else:
        kwargs["type"] = _PARSERS.get(f.name, str)
        if meta["metavar"]:
            kwargs["metavar"] = meta["metavar"]
        if meta["choices"]:
            kwargs["choices"] = meta["choices"]
    p.add_argument(meta["flag"], **kwargs)


def _options_args(p, names=None):
    from .options import option_fields
    for f in option_fields(cli=True):
        if names is None or f.name in names:
            _add_option(p, f)
    p.add_argument("--quiet", action="store_true", help="no progress")


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (``p2s-dask: error: ...``, exit code 2)."""

    def error(self, message):
        raise InputError(message)


def build_parser() -> argparse.ArgumentParser:
    """The ``p2s-dask`` parser; denoise's options come from :class:`Options`."""
    parser = _Parser(
        prog="p2s-dask",
        description="Exact, out-of-core Patch2Self denoising of diffusion MRI.")
    sub = parser.add_subparsers(dest="command", required=True)

    conv = sub.add_parser("convert", help="NIfTI <-> Zarr (chosen by the names)")
    conv.add_argument("input", metavar="IN")
    conv.add_argument("output", metavar="OUT")
    conv.add_argument("--bvals", default=None)
    conv.add_argument("--bvecs", default=None)
    _options_args(conv, _COMMON + ("chunks",))

    den = sub.add_parser("denoise", help="denoise IN into OUT (each NIfTI or Zarr)")
    den.add_argument("input", metavar="IN")
    den.add_argument("output", metavar="OUT")
    den.add_argument("--bvals", default=None,
                     help="FSL bvals (default: stored in a Zarr IN, or IN's .bval sibling)")
    den.add_argument("--bvecs", default=None)
    den.add_argument("--report-json", default=None, metavar="FILE",
                     help="also write the run's timings and peak memory as JSON")
    _options_args(den)

    demo = sub.add_parser("demo", help="denoise the bundled example data")
    demo.add_argument("--out-dir", default="p2s_demo",
                      help="where to write the result and figure (default %(default)s)")
    demo.add_argument("--overwrite", action="store_true")
    demo.add_argument("--quiet", action="store_true")
    return parser


def _convert(args):
    from .io import kind_of, nifti_to_zarr, zarr_to_nifti
    src, dst = kind_of(args.input), kind_of(args.output)
    common = dict(memory_limit=args.memory_limit, overwrite=args.overwrite,
                  storage_options=args.storage_options, tmp_dir=args.tmp_dir,
                  progress=not args.quiet)
    if src == "nifti" and dst == "zarr":
        nifti_to_zarr(args.input, args.output, chunks=args.chunks, bvals=args.bvals,
                      bvecs=args.bvecs, **common)
    elif src == "zarr" and dst == "nifti":
        zarr_to_nifti(args.input, args.output, **common)
    else:
        raise InputError(f"convert goes from NIfTI to Zarr or back; got {src} -> {dst}")
    print(f"p2s-dask: wrote {args.output}")


def _denoise(args):
    from .options import Options, option_fields
    from .pipeline import denoise_file
    values = {f.name: getattr(args, f.name) for f in option_fields(cli=True)}
    options = Options(**values, progress=not args.quiet)
    report = denoise_file(args.input, args.output, bvals=args.bvals, bvecs=args.bvecs,
                          options=options)
    if report.started_over:
        print(f"p2s-dask: starting over: {report.started_over}", file=sys.stderr)
    if report.resumed:
        print(f"p2s-dask: resumed from earlier work: {', '.join(report.resumed)}")
    print(report.summary_line())
    if args.report_json:
        with open(args.report_json, "w") as fh:
            json.dump(report.as_dict(), fh, indent=1)


def _demo(args):
    from .demo import run_demo
    run_demo(args.out_dir, overwrite=args.overwrite, progress=not args.quiet)


def _one_line_warning(message, category, filename, lineno, line=None):
    return f"p2s-dask: warning: {message}\n"


def _in_cli_words(exc: InputError) -> str:
    from .errors import OutputExistsError
    if isinstance(exc, OutputExistsError):
        return f"{exc}; use --overwrite to replace it"
    return str(exc)


def main(argv=None) -> int:
    """Entry point of the ``p2s-dask`` console script."""
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
    handlers = {"convert": _convert, "denoise": _denoise, "demo": _demo}
    from .options import front
    try:
        with front("cli"):
            handlers[args.command](args)
    except InputError as exc:
        print(f"p2s-dask: error: {_in_cli_words(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("p2s-dask: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
