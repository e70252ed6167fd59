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


@dataclass
class Job:
    """One pair of a batch, with what was decided before any work."""

    inp: str
    out: str
    todo: str  # 'run', 'skip' or 'fail'
    message: str = ""
    ours: frozenset = frozenset()


def decide(inp, out, opts: Options, bvals=None, bvecs=None) -> Job:
    """Skip, run or fail one pair, by fingerprint (reads headers only)."""
    inp, out = str(inp), str(out)
    try:
        run = describe_run(inp, out, bvals, bvecs, opts)
        so = opts.storage_options
        if not exists(out, so):
            return Job(inp, out, "run", ours=frozenset(unfinished_work(out, opts)))
        recorded = recorded_fingerprint(out, so)
        if recorded is None:
            return Job(inp, out, "run", ours=frozenset(unfinished_work(out, opts)))
        current = result_fingerprint(run)
        if recorded == current and not opts.overwrite:
            return Job(inp, out, "skip", "already done")
        mine = {canonical(out)} | {canonical(u) for u in sidecar_urls(out).values()}
        why = "replaced (--overwrite)" if recorded == current else \
            f"redone: {why_redone(recorded, current)}"
        return Job(inp, out, "run", why, ours=frozenset(mine))
    except InputError as exc:
        return Job(inp, out, "fail", str(exc))


def plan_batch(pairs, opts: Options, *, bvals=None, bvecs=None, extra=Manifest()):
    """Decide every pair and check the batch's manifest once.

    Parameters
    ----------
    pairs : sequence of (str, str)
    opts : Options
    bvals, bvecs : optional
        The same for every run (``--bvals``/``--bvecs``).
    extra : Manifest
        What the front writes besides the runs (folders, a log, BIDS files).

    Returns
    -------
    (list of Job, Manifest)

    Raises
    ------
    InputError
        When two runs would write one place, or a run would write a place
        that any run reads: nothing runs then.
    """
    jobs = [decide(i, o, opts, bvals, bvecs) for i, o in pairs]
    manifest = extra
    for job in jobs:
        # every pair's input is read by the batch, even one skipped or failed
        own = run_manifest(job.inp, job.out, opts, bvals=bvals, bvecs=bvecs, label=job.inp)
        manifest += own if job.todo == "run" else Manifest(reads=own.reads)
    check_layout(manifest)
    problems = check_existing(manifest, overwrite=opts.overwrite,
                              ours=set().union(*[j.ours for j in jobs]),
                              storage_options=opts.storage_options)
    for job in jobs:
        if job.todo == "run" and job.inp in problems:
            job.todo, job.message = "fail", problems[job.inp]
    return jobs, manifest


def denoise_many(jobs, manifest, options: Options, *, bvals=None, bvecs=None,
                 say=print) -> list:
    """Run the decided jobs with one executor; one line per run.

    Returns
    -------
    list of Outcome
    """
    outcomes = []
    budget = parse_memory_limit(options.memory_limit)
    make_folders(manifest)
    with open_executor(scheduler=options.scheduler, scheduler_file=options.scheduler_file,
                       workers=options.workers, threads=options.threads,
                       memory_limit=budget) as executor:
        for i, job in enumerate(jobs, 1):
            outcome = _one(job, options, executor, manifest, (bvals, bvecs))
            outcomes.append(outcome)
            say(f"p2s-dask: [{i}/{len(jobs)}] {outcome.status} {job.out}"
                + (f" ({outcome.seconds:.1f} s)" if outcome.status == "denoised" else "")
                + (f": {outcome.message}" if outcome.message else ""))
    return outcomes


def _one(job: Job, options, executor, manifest, gradients) -> Outcome:
    if job.todo != "run":
        status = "skipped" if job.todo == "skip" else "failed"
        return Outcome(job.inp, job.out, status, message=job.message)
    # another process of the same batch may have done it since we decided
    again = decide(job.inp, job.out, options, *gradients)
    if again.todo == "skip":
        return Outcome(job.inp, job.out, "skipped", message=again.message)
    start = time.perf_counter()
    made = []
    try:
        made = make_folders(manifest, job.inp)
        denoise_file(job.inp, job.out, bvals=gradients[0], bvecs=gradients[1],
                     options=options, executor=executor, manifest=manifest)
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
