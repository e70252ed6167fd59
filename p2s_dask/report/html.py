"""The report's HTML: one section per run, pages of sections.

A page is one self-contained file: its style is inline and every image is a
``data:`` URI, so it opens offline, mailed or copied anywhere. A run's
section is also written alone (a NiPreps "reportlet") beside its figures,
naming them by file name; :func:`inline_images` turns those names into
``data:`` URIs when a subject's page is put together.

Every text that comes from the run (paths, option values) is escaped.
"""

from __future__ import annotations

import base64
import html
import json
import re

from .. import __version__

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;padding:0 1.5em;max-width:72em;
color:#222}
h1{font-size:1.5em}h2{font-size:1.25em;border-bottom:1px solid #ccc}h3{font-size:1.05em}
section.qc-run-report{margin-bottom:3em}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ddd;padding:2px 8px;
text-align:left;vertical-align:top}
img{max-width:100%;height:auto;display:block}
.flagged-volumes li{color:#b00}.no-flags{color:#070}
p.note{color:#555;font-size:.9em;max-width:60em}
"""

# what each part shows, under its heading
_NOTES = {
    "qc-mosaics": "A b0 and the first volume of each shell, a few axial slices: the input "
                  "(original), the output as written (denoised) and their difference "
                  "(residual), on one grey scale (the residual's window is as wide, centred "
                  "on zero). Anatomy in the residual is signal that the denoiser removed.",
    "qc-noise": "The residuals' root mean square over the diffusion volumes, per voxel "
                "(also written as a NIfTI image beside the output). Patch2Self's residual "
                "is mostly noise: the map should look like the scanner's noise field, "
                "without anatomy.",
    "qc-residuals": "Residual RMS per volume, and per volume and axial slice relative to "
                    "the median of the volumes of the same shell. A volume is flagged when "
                    "one of its slices (or the whole volume) stands far above its shell's "
                    "median (robust z-score and ratio, see the run's JSON report): a "
                    "dropped or darkened slice, motion or a spike. Flagged volumes are "
                    "worth a look; they are not removed.",
    "qc-histogram": "The residuals (a uniform sample over voxels and denoised volumes) "
                    "against a normal distribution of the same mean and standard "
                    "deviation; heavy tails point at outliers or structure.",
}


def data_uri(png: bytes) -> str:
    """A PNG as a ``data:`` URI."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def escape(value) -> str:
    """``value`` as HTML text (quotes too)."""
    return html.escape(str(value), quote=True)


_e = escape


def _flag_list(qc: dict) -> str:
    flagged = qc.get("flagged") or []
    if not flagged:
        return '<p class="no-flags">No volume flagged.</p>'
    items = []
    for f in flagged:
        where = (f"slice{'s' if len(f['slices']) > 1 else ''} "
                 f"{', '.join(map(str, f['slices']))}" if f["slices"] else "the whole volume")
        items.append(f'<li class="flagged-volume" data-volume="{int(f["volume"])}">volume '
                     f'{int(f["volume"])} ({_e(f["group"])}): {where}, '
                     f'residual RMS {f["ratio"]:.2f} times the shell\'s median '
                     f'(robust z {f["z"]:.1f})</li>')
    return f'<ul class="flagged-volumes">{"".join(items)}</ul>'


def _table(rows) -> str:
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _run_table(info: dict) -> str:
    """Options, version, times and peak memory of the run."""
    stages = ", ".join(f"{k} {v:.2f} s" for k, v in (info.get("stages") or {}).items())
    rows = [("input", info.get("input", "")), ("output", info.get("output", "")),
            ("shape", " x ".join(map(str, info.get("shape", [])))),
            ("p2s-dask version", info.get("version", __version__)),
            ("total time", f"{info.get('seconds', 0.0):.2f} s"), ("stages", stages),
            ("peak memory", f"{info.get('peak_rss', 0) / 2**20:,.0f} MiB"),
            ("resumed", ", ".join(info.get("resumed") or []) or "no")]
    options = info.get("options") or {}
    rows += [(f"option {k}", json.dumps(v)) for k, v in sorted(options.items())]
    return _table(rows)


def _cv_rows(cv) -> list:
    """The rows of held-out errors in a run's ``cross_validation``: a list
    of rows, a sidecar's record (``HeldOutErrors``) or the run's own record
    (each group's ``candidates`` under ``table``)."""
    if isinstance(cv, list):
        return cv
    if not isinstance(cv, dict):
        return []
    if "HeldOutErrors" in cv or "rows" in cv:
        return list(cv.get("HeldOutErrors") or cv.get("rows") or [])
    groups = (cv.get("table") or {}).get("groups") or {}
    return [{"group": name, **row} for name, table in groups.items()
            for row in table.get("candidates", [])]


def _plain(value) -> bool:
    """A value a table cell shows (numbers, words, a radius), not detail."""
    if isinstance(value, (list, tuple)):
        return len(value) <= 3 and all(isinstance(v, (int, float, str)) for v in value)
    return isinstance(value, (int, float, str, bool)) or value is None


def cross_validation_table(cv) -> str:
    """The held-out errors a run's report may carry (``cross_validation``),
    as a table, with the setting chosen from them."""
    rows = [{k: v for k, v in row.items() if _plain(v)} for row in _cv_rows(cv)]
    if not rows:
        return ""
    cols = list(dict.fromkeys(k for row in rows for k in row))
    head = "".join(f"<th>{_e(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_e(row.get(c, ''))}</td>" for c in cols) + "</tr>"
                   for row in rows)
    chosen = cv.get("setting") or cv.get("Chosen") if isinstance(cv, dict) else None
    note = f"<p>Chosen: {_e(json.dumps(chosen))}</p>" if chosen else ""
    return f"{note}<table><tr>{head}</tr>{body}</table>"


def _figure(cls, title, src) -> str:
    return (f'<section class="{cls}"><h3>{_e(title)}</h3><p class="note">{_e(_NOTES[cls])}'
            f'</p><img src="{_e(src)}" alt="{_e(title)}"></section>')


def run_section(info: dict, images: dict, title: str) -> str:
    """One run's part of a page.

    Parameters
    ----------
    info : dict
        The run's report (:meth:`p2s_dask.run.pipeline.Report.as_dict`), with
        its ``qc``; a ``cross_validation`` entry, when present, is shown as
        a table of held-out errors.
    images : dict
        ``{figure name: src}`` for each figure of
        :data:`~.figures.FIGURES`: a ``data:`` URI or a file name.
    title : str

    Returns
    -------
    str
    """
    qc = info.get("qc") or {}
    parts = [f'<section class="qc-run-report"><h2>{_e(title)}</h2>',
             f'<section class="qc-summary"><h3>Flagged volumes</h3>{_flag_list(qc)}</section>',
             _figure("qc-residuals", "Residuals per volume and slice", images["residuals"]),
             _figure("qc-mosaics", "Original, denoised, residual", images["mosaic"]),
             _figure("qc-noise", "Noise map", images["noise"]),
             _figure("qc-histogram", "Residual histogram", images["histogram"])]
    cv = info.get("cross_validation")
    if cv:
        parts.append('<section class="qc-cross-validation"><h3>Held-out errors</h3>'
                     f'{cross_validation_table(cv)}</section>')
    parts.append(f'<section class="qc-run"><h3>The run</h3>{_run_table(info)}</section>')
    return "".join(parts) + "</section>"


def page(title: str, sections) -> str:
    """A whole self-contained page of ``sections`` (HTML strings)."""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"generator\" content=\"p2s-dask {_e(__version__)}\">"
            f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>"
            f"<h1>{_e(title)}</h1>{''.join(sections)}</body></html>\n")


_SRC = re.compile(r'src="([^":/]+\.png)"')


def inline_images(fragment: str, read) -> str:
    """``fragment`` with each image named by a bare file name replaced by
    a ``data:`` URI of ``read(name)`` (its bytes)."""
    return _SRC.sub(lambda m: f'src="{data_uri(read(html.unescape(m[1])))}"', fragment)
