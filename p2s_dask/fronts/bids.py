"""BIDS datasets: find every DWI run and its gradients, name its ``desc-p2s`` derivative.

A small parser of the BIDS naming rules (entities ``key-label`` joined by
``_``, a suffix, an extension; entities in the specification's order), not
pybids: finding DWI runs needs the file names only, and pybids indexes every
file of a dataset into a database first (minutes on large datasets) and
brings SQLAlchemy and a dozen packages along. The rules used here are the
specification's (entity table, the inheritance principle, BIDS URIs,
"Derivatives: common data types").

The dataset is listed through fsspec, so BIDS_DIR may be a local folder or
an object-store prefix (``s3://bucket/ds``) alike: its top folder once, then
the whole tree of each wanted subject in one listing (an object store lists
a thousand keys a request and has no folders to walk); ``derivatives/`` and
the subjects not asked for are never listed.
"""

from __future__ import annotations

import logging
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..errors import InputError
from ..io.sidecars import read_json
from ..io.urls import exists, fs_and_path, is_local, join, local_path, user_errors
from ..planning.manifest import How, Manifest, Place, Write, canonical
from ..planning.paths import folders_between
from .batch import Pair

logger = logging.getLogger("p2s_dask")

# the specification's entity order (those that may appear on DWI files, and
# desc for derivatives)
ENTITIES = ("sub", "ses", "task", "acq", "ce", "trc", "stain", "rec", "dir", "run",
            "mod", "echo", "flip", "inv", "mt", "part", "proc", "hemi", "space", "split",
            "recording", "chunk", "res", "den", "label", "desc")
_LABEL = r"[a-zA-Z0-9]+"
_NAME = re.compile(r"^(?P<entities>(?:[a-z]+-[a-zA-Z0-9]+_)*)(?P<suffix>[a-zA-Z0-9]+)"
                   r"(?P<ext>\.[a-z.]+)$")
DESC = "p2s"
IMAGES = (".nii", ".nii.gz")
GRADIENTS = (".bval", ".bvec")
# the name of the raw dataset in the derivative's BIDS URIs and DatasetLinks
SOURCE_NAME = "raw"
_RULES = ("expected sub-<label>[_ses-<label>][_<key>-<label>...]_dwi.nii[.gz] with the "
          "entities in the specification's order")


@dataclass(frozen=True)
class BidsName:
    """A parsed BIDS file name."""

    entities: tuple  # ((key, label), ...) in file order
    suffix: str
    extension: str

    def get(self, key, default=None):
        return dict(self.entities).get(key, default)

    def with_entity(self, key, label) -> "BidsName":
        """A copy with ``key-label`` set, in the specification's order."""
        items = dict(self.entities)
        items[key] = label
        order = sorted(items, key=lambda k: ENTITIES.index(k) if k in ENTITIES else 99)
        return BidsName(tuple((k, items[k]) for k in order), self.suffix, self.extension)

    def with_extension(self, extension) -> "BidsName":
        return BidsName(self.entities, self.suffix, extension)

    def __str__(self) -> str:
        ents = "".join(f"{k}-{v}_" for k, v in self.entities)
        return f"{ents}{self.suffix}{self.extension}"


def parse_name(name: str, *, inherited=False) -> BidsName | None:
    """The entities, suffix and extension of a BIDS file name (None if it is
    not one: unknown or repeated entity, entities out of order).

    Parameters
    ----------
    name : str
    inherited : bool
        A metadata file that may apply to many data files (inheritance
        principle): it may lack ``sub`` or any entity (``dwi.bval``).
    """
    m = _NAME.match(name)
    if not m:
        return None
    text = m["entities"].rstrip("_")
    pairs = tuple(tuple(p.split("-", 1)) for p in text.split("_")) if text else ()
    keys = [k for k, _ in pairs]
    if not inherited and (not keys or keys[0] != "sub"):
        return None
    if len(set(keys)) != len(keys) or any(k not in ENTITIES for k in keys):
        return None
    if [ENTITIES.index(k) for k in keys] != sorted(ENTITIES.index(k) for k in keys):
        return None
    if not all(re.fullmatch(_LABEL, v) for _, v in pairs):
        return None
    return BidsName(pairs, m["suffix"], m["ext"])


@dataclass(frozen=True)
class Gradients:
    """A run's ``.bval`` and ``.bvec`` in its dataset (paths inside it,
    chosen by the inheritance principle; None: the dataset has none), or
    why none can be chosen."""

    bval: str | None = None
    bvec: str | None = None
    problem: str = ""


@dataclass(frozen=True)
class DwiRun:
    """One DWI run of a dataset and where its derivative goes (a path or
    URL under OUTPUT_DIR, joined as text so that ``s3://`` stays a URL)."""

    root: str  # BIDS_DIR as given: a path or URL
    rel: str  # the image inside the dataset ('/'-separated)
    name: BidsName
    output: str
    folder: str  # the output's folder: OUTPUT_DIR/sub-XX[/ses-YY]/dwi
    gradients: Gradients = Gradients()

    @property
    def path(self) -> str:
        """The image's path or URL."""
        return self.url(self.rel)

    @property
    def label(self) -> str:
        return str(self.name).removesuffix(self.name.extension)

    def url(self, rel: str) -> str:
        """The path or URL of ``rel``, a file of the run's dataset."""
        return join(self.root, rel)

    def own(self, extension: str) -> str:
        """The run's own file with ``extension`` (``sub-01_dwi.bval``), in the dataset."""
        return self.rel.removesuffix(self.name.extension) + extension


def _labels(values):
    return None if not values else {v.removeprefix("sub-").removeprefix("ses-") for v in values}


def find_dwi_runs(bids_dir, output_dir, participants=None, sessions=None,
                  storage_options=None) -> list:
    """Every DWI run (``sub-*/[ses-*/]dwi/*_dwi.nii[.gz]``), sorted, with its gradients.

    A file of a ``dwi`` folder that looks like a DWI image (``.nii`` or
    ``.nii.gz`` with ``dwi`` in its name) but breaks the naming rules is
    skipped with one warning line.

    Parameters
    ----------
    bids_dir, output_dir : str or Path
        Local paths or URLs (``s3://...``).
    participants, sessions : sequence of str, optional
        Labels to keep (with or without ``sub-``/``ses-``).
    storage_options : dict, optional

    Returns
    -------
    list of DwiRun
    """
    root, out = str(bids_dir), str(output_dir)
    if not exists(join(root, "dataset_description.json"), storage_options):
        raise InputError(f"{bids_dir} is not a BIDS dataset (no dataset_description.json)")
    want_sub, want_ses = _labels(participants), _labels(sessions)
    folders = _listing(root, storage_options, want_sub)
    runs = []
    for folder in sorted(f for f in folders if _is_dwi_folder(f)):
        for file_name in sorted(folders[folder]):
            name = _dwi_image(folder, file_name)
            if name is None or (want_ses and name.get("ses") not in want_ses):
                continue
            runs.append(_run(root, out, folder, name, folders))
    if want_sub and not runs:
        raise InputError(f"no DWI runs for --participant-label {' '.join(sorted(want_sub))}")
    return runs


def _listing(bids_dir: str, storage_options, want_sub) -> dict:
    """``{folder: [file names]}`` of the dataset's top folder (``''``) and of
    every folder under each wanted subject (paths inside the dataset)."""
    fs, root = fs_and_path(bids_dir, storage_options)
    root = root.rstrip("/")
    folders = {"": []}
    with user_errors(bids_dir, "listing"):
        # a listing cached by this file system instance may predate the run
        fs.invalidate_cache(root)
        for entry in fs.ls(root, detail=True):
            top = entry["name"].rstrip("/")
            name = posixpath.basename(top)
            if entry["type"] != "directory":
                folders[""].append(name)
            elif name.startswith("sub-") and (not want_sub or name[4:] in want_sub):
                for path in fs.find(top):
                    if path.startswith(top + "/"):
                        folder, _, file_name = f"{name}/{path[len(top) + 1:]}".rpartition("/")
                        folders.setdefault(folder, []).append(file_name)
    return folders


def _is_dwi_folder(folder: str) -> bool:
    """``sub-XX/dwi`` or ``sub-XX/ses-YY/dwi``."""
    parts = folder.split("/")
    return parts[-1] == "dwi" and (len(parts) == 2 or (
        len(parts) == 3 and parts[1].startswith("ses-")))


def _dwi_image(folder: str, file_name: str) -> BidsName | None:
    """The name of a DWI image of ``folder`` (a ``dwi`` folder), or None:
    another file, or a misnamed DWI image (one warning line)."""
    if not file_name.endswith(IMAGES):
        return None
    name = parse_name(file_name)
    valid = name is not None and name.extension in IMAGES
    if valid and name.suffix != "dwi":
        return None  # another BIDS image of the folder (an sbref)
    parts = folder.split("/")
    session = parts[1][4:] if len(parts) == 3 else None
    if valid and name.get("sub") == parts[0][4:] and name.get("ses") == session:
        return name
    if "dwi" in file_name.lower():
        why = "its subject or session is not its folder's" if valid else _RULES
        logger.warning("%s/%s looks like a DWI image but does not follow the BIDS naming "
                       "rules (%s); skipped", folder, file_name, why)
    return None


def _run(root: str, output_dir: str, folder: str, name: BidsName, folders) -> DwiRun:
    out_name = name.with_entity("desc", DESC).with_extension(".nii.gz")
    out_folder = join(output_dir, folder)
    return DwiRun(root, f"{folder}/{name}", name, join(out_folder, str(out_name)),
                  out_folder, inherited_gradients(folders, folder, name))


def inherited_gradients(folders: dict, folder: str, name: BidsName) -> Gradients:
    """The ``.bval`` and ``.bvec`` that apply to the image ``name`` of
    ``folder`` by the inheritance principle.

    A file applies when it has the ``dwi`` suffix and no entity the image
    lacks (``dwi.bval``, ``acq-multiband_dwi.bval``), in the image's folder
    or one above it; the nearest one wins. Two at one level are ambiguous
    (the specification forbids it), unless one is the image's own.

    Parameters
    ----------
    folders : dict
        ``{folder: [file names]}`` of the dataset (paths inside it).
    folder : str
    name : BidsName

    Returns
    -------
    Gradients
    """
    found = {}
    for extension in GRADIENTS:
        found[extension], problem = _nearest(folders, folder, name, extension)
        if problem:
            return Gradients(problem=problem)
    return Gradients(found[".bval"], found[".bvec"])


def _nearest(folders, folder, name, extension):
    """(path inside the dataset or None, problem) of the nearest applicable file."""
    own = str(name.with_extension(extension))
    parts = folder.split("/")
    for depth in range(len(parts), -1, -1):
        level = "/".join(parts[:depth])
        names = [f for f in folders.get(level, ()) if _applies(f, name, extension)]
        if own in names:
            names = [own]  # the image's own file is the most specific there can be
        paths = [f"{level}/{f}" if level else f for f in names]
        if len(paths) > 1:
            return None, (f"{' and '.join(sorted(paths))} apply to {folder}/{name} at "
                          "one level; the BIDS inheritance principle allows one there")
        if paths:
            return paths[0], ""
    return None, ""


def _applies(file_name: str, data: BidsName, extension: str) -> bool:
    meta = parse_name(file_name, inherited=True)
    return meta is not None and meta.extension == extension and meta.suffix == data.suffix \
        and set(meta.entities) <= set(data.entities)


def run_pair(run: DwiRun, bvals=None, bvecs=None) -> Pair:
    """What the batch runs for ``run``.

    The gradient files are the dataset's (the run's own, else the nearest
    inherited one); ``bvals``/``bvecs`` (``--bvals``/``--bvecs``) are for
    the runs the dataset gives none. The output's ``Sources`` are BIDS URIs
    of the dataset's files used (``bids:raw:sub-01/dwi/sub-01_dwi.nii.gz``).

    Returns
    -------
    Pair
        With ``problem`` set when the run cannot have gradients.
    """
    g = run.gradients
    sources = tuple(f"bids:{SOURCE_NAME}:{rel}" for rel in (run.rel, g.bval, g.bvec) if rel)
    if not g.problem and g.bval is None and bvals is None:
        g = Gradients(problem=(
            f"no .bval for {run.rel}: none beside it and none inherited from its session, "
            "subject or dataset folder (a dwi.bval at the top applies to every run); "
            "add one, or give --bvals"))
    if g.problem:
        return Pair(run.path, run.output, sources=sources, problem=g.problem)
    # the run's own files are what a single run finds by itself: named only
    # when an inherited file comes with them
    own_bval = g.bval == run.own(".bval")
    pass_bvals = None if own_bval else run.url(g.bval) if g.bval else bvals
    if g.bvec is None:
        pass_bvecs = bvecs
    else:
        pass_bvecs = None if own_bval and g.bvec == run.own(".bvec") else run.url(g.bvec)
    return Pair(run.path, run.output, pass_bvals, pass_bvecs, sources)


def dataset_uri(bids_dir) -> str:
    """BIDS_DIR as a URI: ``file://`` of its real path, or its normalised URL."""
    text = str(bids_dir)
    if is_local(text):
        return Path(local_path(text)).resolve().as_uri()
    return canonical(text).rstrip("/")


def dataset_description(bids_dir) -> dict:
    """The derivative dataset's ``dataset_description.json``: its outputs'
    ``Sources`` name the raw dataset ``raw``, linked here (BIDS URIs)."""
    uri = dataset_uri(bids_dir)
    return {"Name": "Patch2Self denoised DWI (p2s-dask)", "BIDSVersion": "1.9.0",
            "DatasetType": "derivative",
            "GeneratedBy": [{"Name": "p2s-dask", "Version": __version__,
                             "Description": "Exact Patch2Self denoising"}],
            "SourceDatasets": [{"URL": uri}],
            "DatasetLinks": {SOURCE_NAME: uri}}


def description_url(output_dir) -> str:
    """Where the derivative's ``dataset_description.json`` goes."""
    return join(str(output_dir), "dataset_description.json")


def keep_description(output_dir, bids_dir, storage_options=None) -> bool:
    """Whether OUTPUT_DIR's ``dataset_description.json`` is ours and links
    BIDS_DIR (kept); False: it has none, or ours needs rewriting (one of an
    earlier release without ``DatasetLinks``, or one linking another
    dataset, said in one warning line).

    Raises
    ------
    InputError
        When it has one of another tool or one that is not JSON.
    """
    url = description_url(output_dir)
    try:
        old = read_json(url, storage_options)
    except InputError:
        old = {}  # not JSON: not ours either
    if old is None:
        return False
    try:
        names = [g.get("Name") for g in old.get("GeneratedBy", [])]
        link = (old.get("DatasetLinks") or {}).get(SOURCE_NAME)
    except (AttributeError, TypeError):
        names, link = [], None
    if "p2s-dask" not in names:
        raise InputError(f"{url} belongs to another dataset (not made by p2s-dask); "
                         "choose another OUTPUT_DIR")
    uri = dataset_uri(bids_dir)
    if link is not None and link != uri:
        logger.warning("%s linked the raw dataset %s; it now links %s", url, link, uri)
    return link == uri


def bids_manifest(runs, output_dir, *, keep_description: bool) -> Manifest:
    """What ``bids`` writes besides the runs: OUTPUT_DIR, each run's folders
    (made when the run starts) and ``dataset_description.json``."""
    # spelled as the runs' folders are (a local one absolute), or no folder
    # between OUTPUT_DIR and a run's would be planned
    root = join(str(output_dir), "").rstrip("/")
    manifest = folders_between(root, root, flag="OUTPUT_DIR")
    for r in runs:
        manifest += folders_between(root, r.folder, flag="OUTPUT_DIR", label=r.path)
    if not keep_description:
        manifest += Manifest(writes=(Write("description", Place.of(description_url(root)),
                                           How.KEEP, flag="OUTPUT_DIR"),))
    return manifest


# -- the QC report, in NiPreps' layout ----------------------------------------------
# OUTPUT_DIR/sub-XX.html, one page per subject; each run's figures and section
# under OUTPUT_DIR/sub-XX/figures/, named after the run with desc-p2s<figure>;
# its noise map beside its derivative as <entities>_desc-p2snoise_dwimap.nii.gz:
# desc is the specification's entity for a derivative's kind, and dwimap the
# suffix that the diffusion derivatives proposal (BEP016, as QSIRecon writes
# it) gives a voxel-wise map computed from DWI; a _dwi suffix would claim a
# 4D image with gradients (and make the map a DWI run to BIDS tools)
NOISE_DESC, SECTION_DESC = "p2snoise", "p2sreport"


def figures_folder(output_dir, run: DwiRun) -> str:
    """Where a run's reportlets go: ``OUTPUT_DIR/sub-XX/figures``."""
    return join(str(output_dir), f"sub-{run.name.get('sub')}/figures")


def page_url(output_dir, subject) -> str:
    """A subject's report page: ``OUTPUT_DIR/sub-XX.html``."""
    return join(str(output_dir), f"sub-{subject}.html")


def report_urls(run: DwiRun, output_dir) -> dict:
    """``{manifest role: path}`` of a run's noise map and reportlets."""
    from ..planning.paths import QC_FIGURES, QC_NOISE, QC_SECTION, qc_figure_role

    def named(desc, suffix, extension):
        return str(BidsName(run.name.with_entity("desc", desc).entities, suffix, extension))

    folder = figures_folder(output_dir, run)
    urls = {QC_NOISE: join(run.folder, named(NOISE_DESC, "dwimap", ".nii.gz")),
            QC_SECTION: join(folder, named(SECTION_DESC, "dwi", ".html"))}
    urls.update({qc_figure_role(f): join(folder, named(f"p2s{f}", "dwi", ".png"))
                 for f in QC_FIGURES})
    return urls


def report_targets(runs, output_dir, matplotlib=None) -> Manifest:
    """What the QC report of ``bids`` writes: each subject's page and
    figures folder, each run's noise map and reportlets (the run's own),
    and matplotlib's caches in ``matplotlib``."""
    from ..planning.paths import QC_NOISE, report_manifest
    root = join(str(output_dir), "").rstrip("/")
    manifest = report_manifest("", matplotlib=matplotlib, flag="OUTPUT_DIR")
    for sub in dict.fromkeys(r.name.get("sub") for r in runs):
        manifest += report_manifest("", pages=[page_url(root, sub)], flag="OUTPUT_DIR")
    for r in runs:
        # made when the run starts (and removed if it fails and is empty)
        manifest += folders_between(root, figures_folder(root, r), flag="OUTPUT_DIR",
                                    label=r.path)
        urls = report_urls(r, root)
        manifest += report_manifest(r.path, noise=urls.pop(QC_NOISE), reportlets=urls,
                                    flag="OUTPUT_DIR")
    return manifest


def subject_pages(runs, output_dir, outcomes, manifest, storage_options=None) -> None:
    """Write the page of each subject that a run of this invocation
    denoised (or whose runs were done before and that has none yet), from
    the sections its runs left.

    Parameters
    ----------
    runs : list of DwiRun
    output_dir : str
    outcomes : list of Outcome
        Of the batch, in the order of ``runs``.
    manifest : Manifest
        The checked manifest (it holds the pages).
    storage_options : dict, optional
    """
    from ..planning.paths import QC_PAGE, QC_SECTION
    from ..report import subject_page
    from ..run.targets import put_text
    root = join(str(output_dir), "").rstrip("/")
    pages = {w.place.key: w for w in manifest.targets(QC_PAGE)}
    for sub in dict.fromkeys(r.name.get("sub") for r in runs):
        mine = [(r, o) for r, o in zip(runs, outcomes) if r.name.get("sub") == sub]
        target = pages.get(canonical(page_url(root, sub)))
        # a page is made again with its runs; one that is missing while its
        # runs were done before is made too; runs that all failed make none
        statuses = {o.status for _, o in mine}
        if target is None or not ("denoised" in statuses or (
                "skipped" in statuses and not exists(target.place.url, storage_options))):
            continue
        sections = [report_urls(r, root)[QC_SECTION] for r, _ in mine]
        texts = [_read_text(u, storage_options) for u in sections]

        def read(i, name, sections=sections):
            # a figure that section i names, beside it
            return _read_bytes(posixpath.join(posixpath.dirname(sections[i]), name),
                               storage_options)

        page = subject_page(f"p2s-dask QC report: sub-{sub}",
                            [(r.label, t) for (r, _), t in zip(mine, texts)], read)
        put_text(target, page, storage_options)


def _read_bytes(url, storage_options=None) -> bytes:
    fs, path = fs_and_path(url, storage_options)
    with user_errors(url, "reading"), fs.open(path, "rb") as fh:
        return fh.read()


def _read_text(url, storage_options=None) -> str | None:
    """A reportlet's text, or None when the run left none."""
    if not exists(url, storage_options):
        return None
    return _read_bytes(url, storage_options).decode("utf-8")
