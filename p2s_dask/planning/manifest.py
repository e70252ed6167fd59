"""The manifest: every path a run reads and every path it writes, with its role.

A run (one ``denoise``, a batch, a BIDS dataset, a ``convert``) lists here,
before any work, each place it will read (the input, its gradients and
sidecars, the mask, the groups file) and each place it will create, replace
or append to (the output and its partial names, sidecars, the report, the
log, the work store, the lock, BIDS folders and ``dataset_description.json``).
:mod:`.checker` then applies the safety rules to the whole list at once, and
every writer of the package writes only places handed to it from here (an
audit-hook test checks it).

Places are resolved once, into :class:`Place` values: what a path really
names (a real local path through links, a normalised object-store URL), so
that no rule compares the user's spellings.
"""

from __future__ import annotations

import enum
import os
import posixpath
from dataclasses import dataclass, field

from fsspec.core import split_protocol

from ..io.urls import is_local, local_path

# the endings of the names a target is built under (``.partial``) or moved
# aside to while it is replaced (``.replaced``), next to the target
_ASIDE = (".partial", ".replaced")
# object-store protocols that name the same thing
_PROTOCOL_ALIASES = {"s3a": "s3", "gcs": "gs"}


def canonical(url) -> str:
    """What ``url`` really names: a real local path, or a normalised URL."""
    url = os.fspath(url)
    if is_local(url):
        return os.path.realpath(local_path(url))
    protocol, path = split_protocol(url)
    protocol = _PROTOCOL_ALIASES.get(protocol, protocol)
    return f"{protocol}://{posixpath.normpath('/' + path).lstrip('/')}"


@dataclass(frozen=True)
class Place:
    """One path or URL, as the user gave it and as it really is.

    Attributes
    ----------
    url : str
        As given (or as derived from what was given).
    key : str
        :func:`canonical` of ``url``: what rules compare.
    local : bool
    """

    url: str
    key: str
    local: bool

    @classmethod
    def of(cls, url) -> "Place":
        url = os.fspath(url)
        return cls(url, canonical(url), is_local(url))

    def contains(self, other: "Place") -> bool:
        """``other`` is this place or lies inside it."""
        return other.key == self.key or other.key.startswith(self.key.rstrip("/") + "/")

    def same_file(self, other: "Place") -> bool:
        """The same local file under two names (a hard link)."""
        if not (self.local and other.local):
            return False
        try:
            return os.path.samefile(self.key, other.key)
        except OSError:
            return False

    def __str__(self) -> str:
        return self.url


class How(enum.Enum):
    """How a run writes a place."""

    #: a new file or store; an existing one only with --overwrite (or when it
    #: is our own unfinished or stale work), replaced at commit
    CREATE = "create"
    #: lines added at the end (a log file); never replaces
    APPEND = "append"
    #: a folder made if missing; never replaced; may hold other targets
    FOLDER = "folder"
    #: the run's own scratch (work store, lock): made and removed by the run
    SCRATCH = "scratch"
    #: written when missing, kept when it is already ours (BIDS
    #: ``dataset_description.json``)
    KEEP = "keep"


@dataclass(frozen=True)
class Read:
    """A place a run reads: ``role`` says what it is to the run."""

    role: str
    place: Place
    run: str = ""


@dataclass(frozen=True)
class Write:
    """A place a run writes.

    Attributes
    ----------
    role : str
        What it is ('output', 'sidecar', 'report', 'log', 'work store', ...).
    place : Place
    how : How
    run : str
        Which run of a batch writes it ('' for the whole batch).
    flag : str
        The option or argument that named it, for messages ('OUT', '--log-file').
    """

    role: str
    place: Place
    how: How
    run: str = ""
    flag: str = ""

    def covers(self, key: str) -> bool:
        """The real path ``key`` is this target, inside it (a store, a folder,
        the work store) or one of its partial names (a sibling named after
        it and ending in ``.partial``)."""
        mine = self.place.key
        if key == mine or key.startswith(mine.rstrip("/") + "/"):
            return True
        parent, name = posixpath.split(mine.rstrip("/"))
        while key.startswith(parent + "/"):  # a partial name, or inside one (a store)
            kparent, kname = posixpath.split(key)
            if kparent == parent and kname.endswith(_ASIDE) and (
                    kname.startswith(name + ".") or kname.startswith("." + name + ".")):
                return True
            key = kparent
        return False


@dataclass(frozen=True)
class Manifest:
    """Every place a run (or a batch of runs) reads and writes."""

    reads: tuple = ()
    writes: tuple = ()
    scratch_roots: tuple = field(default=())  # --tmp-dir folders

    def __add__(self, other: "Manifest") -> "Manifest":
        return Manifest(self.reads + other.reads, self.writes + other.writes,
                        tuple(dict.fromkeys(self.scratch_roots + other.scratch_roots)))

    def targets(self, role=None) -> list:
        """The write targets (of ``role``, if given)."""
        return [w for w in self.writes if role is None or w.role == role]

    def covers(self, key: str) -> bool:
        """The real path ``key`` is one this manifest lets the run write."""
        return any(w.covers(key) for w in self.writes) or any(
            key == root or key.startswith(root.rstrip("/") + "/") for root in self.scratch_roots)

    def lines(self) -> list:
        """The manifest as text, one place a line (for ``--dry-run``)."""
        out = ["reads:"]
        out += [f"  {r.role:<16} {r.place.url}" + (f"  [{r.run}]" if r.run else "")
                for r in self.reads]
        out.append("writes:")
        out += [f"  {w.role:<16} {w.how.value:<7} {w.place.url}" + (f"  [{w.run}]" if w.run else "")
                for w in self.writes]
        return out

    def as_dict(self) -> dict:
        """Plain JSON of the manifest."""
        return {"reads": [{"role": r.role, "url": r.place.url, "path": r.place.key, "run": r.run}
                          for r in self.reads],
                "writes": [{"role": w.role, "how": w.how.value, "url": w.place.url,
                            "path": w.place.key, "run": w.run} for w in self.writes],
                "scratch_roots": list(self.scratch_roots)}
