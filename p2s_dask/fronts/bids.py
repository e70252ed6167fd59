"""BIDS datasets: find every DWI run, name its ``desc-p2s`` derivative.

A small parser of the BIDS naming rules (entities ``key-label`` joined by
``_``, a suffix, an extension; entities in the specification's order), not
pybids: finding DWI runs needs the file names only, and pybids indexes every
file of a dataset into a database first (minutes on large datasets) and
brings SQLAlchemy and a dozen packages along. The rules used here are the
specification's (entity table, "Derivatives: common data types").
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..errors import InputError
from ..io.sidecars import read_json
from ..io.urls import exists, fs_and_path, join, user_errors
from ..planning.manifest import How, Manifest, Place, Write
from ..planning.paths import folders_between

# the specification's entity order (those that may appear on DWI files, and
# desc for derivatives)
ENTITIES = ("sub", "ses", "task", "acq", "ce", "trc", "stain", "rec", "dir", "run",
            "mod", "echo", "flip", "inv", "mt", "part", "proc", "hemi", "space", "split",
            "recording", "chunk", "res", "den", "label", "desc")
_LABEL = r"[a-zA-Z0-9]+"
_NAME = re.compile(r"^(?P<entities>(?:[a-z]+-[a-zA-Z0-9]+_)+)(?P<suffix>[a-zA-Z0-9]+)"
                   r"(?P<ext>\.[a-z.]+)$")
DESC = "p2s"


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

    def __str__(self) -> str:
        ents = "_".join(f"{k}-{v}" for k, v in self.entities)
        return f"{ents}_{self.suffix}{self.extension}"


def parse_name(name: str) -> BidsName | None:
    """The entities, suffix and extension of a BIDS file name (None if it is
    not one: unknown or repeated entity, entities out of order)."""
    m = _NAME.match(name)
    if not m:
        return None
    pairs = tuple(tuple(p.split("-", 1)) for p in m["entities"].rstrip("_").split("_"))
    keys = [k for k, _ in pairs]
    if keys[0] != "sub" or len(set(keys)) != len(keys) or any(k not in ENTITIES for k in keys):
        return None
    if [ENTITIES.index(k) for k in keys] != sorted(ENTITIES.index(k) for k in keys):
        return None
    if not all(re.fullmatch(_LABEL, v) for _, v in pairs):
        return None
    return BidsName(pairs, m["suffix"], m["ext"])


@dataclass(frozen=True)
class DwiRun:
    """One DWI run of a dataset and where its derivative goes (a path or
    URL under OUTPUT_DIR, joined as text so that ``s3://`` stays a URL)."""

    path: Path
    name: BidsName
    output: str
    folder: str  # the output's folder: OUTPUT_DIR/sub-XX[/ses-YY]/dwi

    @property
    def label(self) -> str:
        return str(self.name).removesuffix(self.name.extension)


def _labels(values):
    return None if not values else {v.removeprefix("sub-").removeprefix("ses-") for v in values}


def find_dwi_runs(bids_dir, output_dir, participants=None, sessions=None) -> list:
    """Every DWI run (``sub-*/[ses-*/]dwi/*_dwi.nii[.gz]``), sorted.

    Parameters
    ----------
    bids_dir, output_dir : str or Path
    participants, sessions : sequence of str, optional
        Labels to keep (with or without ``sub-``/``ses-``).

    Returns
    -------
    list of DwiRun
    """
    root = Path(bids_dir)
    if not (root / "dataset_description.json").is_file():
        raise InputError(f"{bids_dir} is not a BIDS dataset (no dataset_description.json)")
    want_sub, want_ses = _labels(participants), _labels(sessions)
    runs = []
    for path in sorted(root.glob("sub-*/**/dwi/*_dwi.nii*")):
        name = parse_name(path.name)
        if name is None or name.extension not in (".nii", ".nii.gz"):
            continue
        if want_sub and name.get("sub") not in want_sub:
            continue
        if want_ses and name.get("ses") not in want_ses:
            continue
        out_name = name.with_entity("desc", DESC)
        out_name = BidsName(out_name.entities, out_name.suffix, ".nii.gz")
        folder = join(str(output_dir), path.parent.relative_to(root).as_posix())
        runs.append(DwiRun(path, name, join(folder, str(out_name)), folder))
    if want_sub and not any(r.name.get("sub") in want_sub for r in runs):
        raise InputError(f"no DWI runs for --participant-label {' '.join(sorted(want_sub))}")
    return runs


def dataset_description(bids_dir) -> dict:
    """The derivative dataset's ``dataset_description.json``."""
    return {"Name": "Patch2Self denoised DWI (p2s-dask)", "BIDSVersion": "1.9.0",
            "DatasetType": "derivative",
            "GeneratedBy": [{"Name": "p2s-dask", "Version": __version__,
                             "Description": "Exact Patch2Self denoising"}],
            "SourceDatasets": [{"URL": Path(bids_dir).resolve().as_uri()}]}


def description_url(output_dir) -> str:
    """Where the derivative's ``dataset_description.json`` goes."""
    return join(str(output_dir), "dataset_description.json")


def description_is_ours(output_dir, storage_options=None) -> bool:
    """Whether OUTPUT_DIR already has a ``dataset_description.json`` of ours
    (False: it has none).

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
    except (AttributeError, TypeError):
        names = []
    if "p2s-dask" not in names:
        raise InputError(f"{url} belongs to another dataset (not made by p2s-dask); "
                         "choose another OUTPUT_DIR")
    return True


def bids_manifest(runs, output_dir, *, keep_description: bool) -> Manifest:
    """What ``bids`` writes besides the runs: OUTPUT_DIR, each run's folders
    (made when the run starts) and ``dataset_description.json``."""
    root = str(output_dir).rstrip("/")
    manifest = folders_between(root, root, flag="OUTPUT_DIR")
    for r in runs:
        manifest += folders_between(root, r.folder, flag="OUTPUT_DIR", label=str(r.path))
    if not keep_description:
        manifest += Manifest(writes=(Write("description", Place.of(description_url(root)),
                                           How.KEEP, flag="OUTPUT_DIR"),))
    return manifest
