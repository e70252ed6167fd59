"""The QC report of a run: residual summaries, figures, pages, the noise map.

How a report is made, in the run's own passes (no pass of its own):

* the prediction pass (:mod:`p2s_dask.run.passes`) summarises each block's
  residuals as it writes the block (:func:`.summaries.block_qc`), Dask merges
  the summaries in a tree, and a resumed run adds those that earlier tasks
  saved in the work store;
* :func:`.results.finish` turns them into the run's :class:`.results.QcResult`
  (with the flagged volumes), which the output pass writes into the output's
  sidecar (``P2SDask.FlaggedVolumes``) with the noise map beside it
  (:func:`write_noise_map`);
* the front renders the page (:func:`single_page`), or for a BIDS dataset
  each run writes its reportlets (:func:`write_reportlets`: its figures and
  its section) and the front puts each subject's page together
  (:func:`subject_page`).

Every file is a target of the run's checked manifest
(:func:`p2s_dask.planning.paths.report_manifest`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..planning.paths import QC_SECTION, qc_figure_role

# figures and html are imported where they are used: matplotlib is loaded
# only by a run that draws a report


def noise_meta(meta):
    """The header of a run's noise map: the input's grid, one float32 3D
    image (a :class:`~p2s_dask.io.meta.DwiMeta` of one volume whose header
    says three dimensions)."""
    one = meta.for_values(np.float32, tuple(meta.shape[:3]) + (1,))
    hdr = one.nifti_header()
    hdr.set_data_shape(tuple(meta.shape[:3]))
    hdr["descrip"] = b"p2s-dask noise map: RMS of the residuals"
    return dataclasses.replace(one, header=bytes(hdr.binaryblock))


def write_noise_map(target, meta, noise, storage_options=None) -> None:
    """Write the noise map (``(x, y, z)`` float32) to ``target``, a manifest
    entry, whole, under a temporary name renamed into place."""
    from ..io.nifti_memory import write_whole
    values = np.asfortranarray(np.asarray(noise, np.float32)[..., None])
    write_whole(target.place.url, noise_meta(meta), values, storage_options)


def draw_in_background(result):
    """Start drawing the figures of ``result`` (a QcResult) in a thread of
    their own; returns a :class:`concurrent.futures.Future` of
    ``{name: PNG bytes}``.

    The figures need only the QC summaries, known when the prediction pass
    ends: drawn while the output pass streams (gzip in C threads), they cost
    the run little of the ~2 s that matplotlib's import and drawing take
    after it (the report's share of the HCP-sized radius-0 run).
    """
    import concurrent.futures
    from . import figures
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="p2s-figures")
    try:
        return pool.submit(figures.draw_all, result)
    finally:
        pool.shutdown(wait=False)


def _drawn(result, drawing=None) -> dict:
    """The figures of ``result``: those ``drawing`` (a Future of
    :func:`draw_in_background`) made, else drawn now."""
    from . import figures
    return drawing.result() if drawing is not None else figures.draw_all(result)


def single_page(info: dict, result, drawing=None) -> str:
    """The self-contained page of one run (``denoise --report``); its
    figures from ``drawing`` when they were started early."""
    from . import html
    images = {name: html.data_uri(png) for name, png in _drawn(result, drawing).items()}
    title = f"p2s-dask QC report: {info.get('output', '')}"
    return html.page(title, [html.run_section(info, images, "Run")])


def write_reportlets(info: dict, result, targets: dict, storage_options=None,
                     drawing=None) -> None:
    """A BIDS run's reportlets: its figures (PNG, from ``drawing`` when they
    were started early) and its section (HTML naming them), each to its
    manifest entry in ``targets`` (by role)."""
    from ..run.targets import put_bytes, put_text
    from . import html
    images = {}
    for name, png in _drawn(result, drawing).items():
        target = targets[qc_figure_role(name)]
        put_bytes(target, png, storage_options)
        images[name] = target.place.url.rstrip("/").rsplit("/", 1)[-1]
    section = html.run_section(info, images, info.get("title") or info.get("input", ""))
    put_text(targets[QC_SECTION], section, storage_options)


def subject_page(title: str, sections, read) -> str:
    """A subject's page from its runs' sections.

    Parameters
    ----------
    title : str
    sections : list of (str, str or None)
        ``(heading, section HTML)`` of each run; None for a run that has
        no reportlets (it failed, or was made before reports).
    read : callable
        ``read(section_index, file_name) -> bytes`` of a figure that a
        section names.
    """
    from . import html
    parts = []
    for i, (heading, section) in enumerate(sections):
        if section is None:
            title = html.escape(heading)
            parts.append(f'<section class="qc-run-report qc-missing"><h2>{title}</h2>'
                         "<p>No QC report for this run (it failed, or it was made "
                         "without one: rerun it with --overwrite).</p></section>")
        else:
            parts.append(html.inline_images(section, lambda name, i=i: read(i, name)))
    return html.page(title, parts)
