"""The ``p2s-dask`` command: convert, denoise, demo."""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from .errors import InputError

DEFAULT_MEMORY = "2GiB"


def _chunks(text):
    parts = [int(p) for p in text.replace("x", ",").split(",") if p.strip()]
    if len(parts) != 3 or min(parts) < 1:
        raise argparse.ArgumentTypeError("--chunks takes three positive ints, e.g. 64,64,16")
    return tuple(parts)


def _radius(text):
    parts = [int(p) for p in text.split(",")]
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


def _common(p):
    p.add_argument("--memory-limit", default=DEFAULT_MEMORY,
                   help="memory budget for the whole run (default %(default)s)")
    p.add_argument("--storage-options", type=_storage, default=None, metavar="JSON",
                   help='fsspec options for s3:// or gs:// URLs, e.g. '
                        '\'{"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}\'')
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing OUT (never done otherwise)")
    p.add_argument("--tmp-dir", default=None,
                   help="where intermediate Zarr stores go (default: next to OUT)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="p2s-dask",
        description="Exact, out-of-core Patch2Self denoising of diffusion MRI.")
    sub = parser.add_subparsers(dest="command", required=True)

    conv = sub.add_parser("convert", help="NIfTI <-> Zarr (chosen by the names)")
    conv.add_argument("input", metavar="IN")
    conv.add_argument("output", metavar="OUT")
    conv.add_argument("--bvals", default=None)
    conv.add_argument("--bvecs", default=None)
    conv.add_argument("--chunks", type=_chunks, default=None, metavar="X,Y,Z")
    _common(conv)

    den = sub.add_parser("denoise", help="denoise IN into OUT (each NIfTI or Zarr)")
    den.add_argument("input", metavar="IN")
    den.add_argument("output", metavar="OUT")
    den.add_argument("--bvals", default=None,
                     help="FSL bvals (default: stored in a Zarr IN, or IN's .bval sibling)")
    den.add_argument("--bvecs", default=None)
    den.add_argument("--mask", default=None, help="NIfTI mask: fit on these voxels only")
    den.add_argument("--patch-radius", type=_radius, default=0, metavar="R")
    den.add_argument("--model", default="ols", help="ols, ridge or lasso (default ols)")
    den.add_argument("--alpha", type=float, default=1.0)
    den.add_argument("--b0-threshold", type=float, default=50)
    den.add_argument("--b0-denoising", type=_bool, default=True, metavar="BOOL")
    den.add_argument("--clip-negative-vals", type=_bool, default=False, metavar="BOOL")
    den.add_argument("--shift-intensity", type=_bool, default=True, metavar="BOOL")
    den.add_argument("--out-dtype", default=None,
                     help="output dtype (default: the input's; float32 for scaled input)")
    den.add_argument("--version", type=int, default=3, choices=(1, 3))
    den.add_argument("--precision", default="auto", choices=("auto", "float32", "float64"),
                     help="arithmetic of the prediction (default auto: float32 when the "
                          "input and output fit it exactly, as DIPY; statistics are float64)")
    den.add_argument("--chunks", type=_chunks, default=None, metavar="X,Y,Z",
                     help="spatial chunk shape (default: from the memory budget)")
    den.add_argument("--workers", type=int, default=None,
                     help="local worker processes (default 1, threads in this process)")
    den.add_argument("--threads", type=int, default=None, help="threads per worker")
    den.add_argument("--report-json", default=None, metavar="FILE",
                     help="also write the run's timings and peak memory as JSON")
    den.add_argument("--scheduler", default=None, metavar="ADDRESS",
                     help="use an existing Dask scheduler (or $P2S_DASK_SCHEDULER)")
    _common(den)

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
    from .pipeline import DenoiseOptions, denoise_file
    options = DenoiseOptions(
        patch_radius=args.patch_radius, model=args.model, b0_threshold=args.b0_threshold,
        out_dtype=args.out_dtype, alpha=args.alpha, b0_denoising=args.b0_denoising,
        clip_negative_vals=args.clip_negative_vals, shift_intensity=args.shift_intensity,
        version=args.version, mask=args.mask, chunks=args.chunks, precision=args.precision)
    report = denoise_file(
        args.input, args.output, bvals=args.bvals, bvecs=args.bvecs, options=options,
        memory_limit=args.memory_limit, workers=args.workers, threads=args.threads,
        scheduler=args.scheduler, overwrite=args.overwrite, tmp_dir=args.tmp_dir,
        storage_options=args.storage_options, progress=not args.quiet)
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


def main(argv=None) -> int:
    """Entry point of the ``p2s-dask`` console script."""
    # users of the command want the warning, not the line of our code
    warnings.formatwarning = _one_line_warning
    args = build_parser().parse_args(argv)
    handlers = {"convert": _convert, "denoise": _denoise, "demo": _demo}
    try:
        handlers[args.command](args)
    except InputError as exc:
        print(f"p2s-dask: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("p2s-dask: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
