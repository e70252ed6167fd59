"""Many runs in one process and one cluster connection.

A lab with 200 subjects should not start a process and connect to the
cluster 200 times: :func:`denoise_many` opens one executor and runs each
(IN, OUT) pair through the same pipeline as a single run, with a summary
line per run and a final table.

Before any work the whole batch is one manifest, checked once: two runs
that would write one place, or a run that would write another's input, stop
the batch before anything is written. Each run is then decided by
fingerprint (the input's identity and content, its gradients, mask and every
option that changes the result, recorded in the output's ``.json`` sidecar):

* ``skipped`` -- the output exists and its recorded fingerprint is this run's;
* ``redone`` -- the output is ours but was made from another input, other
  gradients or other options: it is replaced, with one line saying why;
* a run whose output exists and is not ours fails (``--overwrite`` replaces
  it), and so does one with bad input; the others go on.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

from ..config.options import Options
from ..errors import BusyError, InputError
from ..io.budget import parse_memory_limit
from ..io.urls import describe_error, exists
from ..planning.checker import check_existing, check_layout
from ..io.sidecars import sidecar_urls
from ..planning.manifest import Manifest, canonical
from ..planning.paths import run_manifest
from ..run.executors import open_executor
from ..run.pipeline import denoise_file, describe_run, unfinished_work
from ..run.provenance import recorded_fingerprint, result_fingerprint, why_redone
from ..run.targets import make_folders, remove_empty

logger = logging.getLogger("p2s_dask")


@dataclass
class Outcome:
    """What happened to one (IN, OUT) pair."""

    inp: str
    out: str
    status: str  # 'denoised', 'skipped' or 'failed'
    seconds: float = 0.0
    message: str = ""


@dataclass(frozen=True)
class Pair:
    """One (IN, OUT) of a batch, with what its front found for it.

    Attributes
    ----------
    inp, out : str
    bvals, bvecs : str, optional
        Its gradient files (None: those stored in IN or beside it).
    sources : tuple of str
        Its output's ``Sources`` (a BIDS run's, as BIDS URIs; empty: IN).
    problem : str
        Why it cannot run, found by its front: it fails with this line.
    """

    inp: str
    out: str
    bvals: object = None
    bvecs: object = None
    sources: tuple = ()
    problem: str = ""


@dataclass
class Job:
    """One pair of a batch, with what was decided before any work."""

    pair: Pair
    todo: str  # 'run', 'skip' or 'fail'
    message: str = ""
    ours: frozenset = frozenset()

    @property
    def inp(self) -> str:
        return self.pair.inp

    @property
    def out(self) -> str:
        return self.pair.out


def decide(pair: Pair, opts: Options) -> Job:
    """Skip, run or fail one pair, by fingerprint (reads headers only)."""
    if pair.problem:
        return Job(pair, "fail", pair.problem)
    inp, out = pair.inp, pair.out
    try:
        run = describe_run(inp, out, pair.bvals, pair.bvecs, opts)
        so = opts.storage_options
        if not exists(out, so):
            return Job(pair, "run", ours=frozenset(unfinished_work(out, opts)))
        recorded = recorded_fingerprint(out, so)
        if recorded is None:
            return Job(pair, "run", ours=frozenset(unfinished_work(out, opts)))
        current = result_fingerprint(run)
        if recorded == current and not opts.overwrite:
            return Job(pair, "skip", "already done")
        mine = {canonical(out)} | {canonical(u) for u in sidecar_urls(out).values()}
        why = "replaced (--overwrite)" if recorded == current else \
            f"redone: {why_redone(recorded, current)}"
        return Job(pair, "run", why, ours=frozenset(mine))
    except InputError as exc:
        return Job(pair, "fail", str(exc))


def plan_batch(pairs, opts: Options, *, bvals=None, bvecs=None, extra=Manifest(),
               ours=frozenset()):
    """Decide every pair and check the batch's manifest once.

    Parameters
    ----------
    pairs : sequence of (str, str) or Pair
        A :class:`Pair` brings its own gradients (a BIDS run's).
    opts : Options
    bvals, bvecs : optional
        The gradients of every ``(IN, OUT)`` tuple (``--bvals``/``--bvecs``).
    extra : Manifest
        What the front writes besides the runs (folders, a log, BIDS files).
    ours : set of str
        Keys of existing targets of ``extra`` that the front may replace
        (a BIDS dataset's QC reports of its own).

    Returns
    -------
    (list of Job, Manifest)

    Raises
    ------
    InputError
        When two runs would write one place, or a run would write a place
        that any run reads: nothing runs then.
    """
    pairs = [p if isinstance(p, Pair) else Pair(str(p[0]), str(p[1]), bvals, bvecs)
             for p in pairs]
    jobs = [decide(p, opts) for p in pairs]
    manifest = extra
    for job in jobs:
        # every pair's input (and gradients) is read by the batch, even one
        # skipped or failed
        own = run_manifest(job.inp, job.out, opts, bvals=job.pair.bvals,
                           bvecs=job.pair.bvecs, label=job.inp)
        manifest += own if job.todo == "run" else Manifest(reads=own.reads)
    check_layout(manifest)
    problems = check_existing(manifest, overwrite=opts.overwrite,
                              ours=set(ours).union(*[j.ours for j in jobs]),
                              storage_options=opts.storage_options)
    for job in jobs:
        if job.todo == "run" and job.inp in problems:
            job.todo, job.message = "fail", problems[job.inp]
    return jobs, manifest


def denoise_many(jobs, manifest, options: Options, *, say=print) -> list:
    """Run the decided jobs with one executor; one line per run.

    Each job runs with its own gradients and ``Sources``; a batch with
    nothing to run (every job skipped, or failed before it started) makes
    no folder and opens no executor.

    Returns
    -------
    list of Outcome
    """
    outcomes = []
    busy = any(job.todo == "run" for job in jobs)
    if busy:
        make_folders(manifest)
    with _batch_executor(options) if busy else contextlib.nullcontext() as executor:
        for i, job in enumerate(jobs, 1):
            outcome = _one(job, options, executor, manifest)
            outcomes.append(outcome)
            say(f"p2s-dask: [{i}/{len(jobs)}] {outcome.status} {job.out}"
                + (f" ({outcome.seconds:.1f} s)" if outcome.status == "denoised" else "")
                + (f": {outcome.message}" if outcome.message else ""))
    return outcomes


def _batch_executor(options: Options):
    budget = parse_memory_limit(options.memory_limit)
    return open_executor(scheduler=options.scheduler, scheduler_file=options.scheduler_file,
                         workers=options.workers, threads=options.threads,
                         memory_limit=budget)


def _one(job: Job, options, executor, manifest) -> Outcome:
    if job.todo != "run":
        status = "skipped" if job.todo == "skip" else "failed"
        return Outcome(job.inp, job.out, status, message=job.message)
    # another process of the same batch may have done it since we decided
    again = decide(job.pair, options)
    if again.todo == "skip":
        return Outcome(job.inp, job.out, "skipped", message=again.message)
    start = time.perf_counter()
    made = []
    try:
        made = make_folders(manifest, job.inp)
        denoise_file(job.inp, job.out, bvals=job.pair.bvals, bvecs=job.pair.bvecs,
                     options=options.with_(sources=job.pair.sources or None),
                     executor=executor, manifest=manifest)
    except BusyError as exc:
        return Outcome(job.inp, job.out, "skipped", message=str(exc).split(";")[0])
    except InputError as exc:
        remove_empty(made)
        return Outcome(job.inp, job.out, "failed", message=str(exc))
    except Exception as exc:  # noqa: BLE001 -- one run's failure never stops the batch
        remove_empty(made)
        logger.debug("run %s failed", job.out, exc_info=True)
        text = describe_error(exc) or f"{type(exc).__name__}: {exc}"
        return Outcome(job.inp, job.out, "failed", message=text.splitlines()[0])
    return Outcome(job.inp, job.out, "denoised", time.perf_counter() - start, job.message)


def table(outcomes) -> str:
    """The final table: one row per run, then the totals."""
    width = max([len(o.out) for o in outcomes] + [6])
    rows = [f"{'output':<{width}}  {'status':<8}  seconds",
            f"{'-' * width}  {'-' * 8}  -------"]
    for o in outcomes:
        rows.append(f"{o.out:<{width}}  {o.status:<8}  {o.seconds:7.1f}")
    counts = {s: sum(o.status == s for o in outcomes) for s in ("denoised", "skipped", "failed")}
    rows.append(", ".join(f"{n} {s}" for s, n in counts.items()))
    return "\n".join(rows)
