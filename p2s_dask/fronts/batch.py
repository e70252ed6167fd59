"""Many runs in one process and one cluster connection.

A lab with 200 subjects should not start a process and connect to the
cluster 200 times: :func:`denoise_many` opens one executor and runs each
(IN, OUT) pair through the same pipeline as a single run, with a summary
line per run and a final table. A run whose output is already there, made
from the same input with the same options (its ``.json`` sidecar says so),
is skipped; an unfinished one resumes from its work store; a failed one is
reported and the others go on.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass

from ..errors import InputError
from ..run.executors import open_executor
from ..io.budget import parse_memory_limit
from ..io.sidecars import sidecar_urls
from ..config.options import Options
from ..run.pipeline import denoise_file, work_url

logger = logging.getLogger("p2s_dask")


@dataclass
class Outcome:
    """What happened to one (IN, OUT) pair."""

    inp: str
    out: str
    status: str  # 'denoised', 'skipped' or 'failed'
    seconds: float = 0.0
    message: str = ""


def already_done(inp, out, opts: Options) -> bool:
    """OUT is complete (no work store), from IN, with these options."""
    if not os.path.exists(out) or os.path.exists(work_url(out, opts.tmp_dir)):
        return False
    try:
        with open(sidecar_urls(out)[".json"]) as fh:
            side = json.load(fh)
    except (OSError, ValueError):
        return False
    mine = side.get("P2SDask", {}).get("Options", {})
    wanted = opts.result_fields()
    # an option left at None (e.g. out_dtype) was resolved by the run: any
    # recorded value is the one this run would resolve too
    same = all(mine.get(k) == v for k, v in wanted.items()
               if v is not None)
    return side.get("Sources") == [str(inp)] and same


def denoise_many(pairs, options: Options, *, bvals=None, bvecs=None, say=print) -> list:
    """Denoise every (IN, OUT) pair with one executor; one line per run.

    Parameters
    ----------
    pairs : sequence of (str, str)
    options : Options
    bvals, bvecs : optional
        As for :func:`~p2s_dask.run.pipeline.denoise_file` (the same for all).
    say : callable
        Where the summary lines go.

    Returns
    -------
    list of Outcome
    """
    outcomes = []
    budget = parse_memory_limit(options.memory_limit)
    with open_executor(scheduler=options.scheduler, scheduler_file=options.scheduler_file,
                       workers=options.workers, threads=options.threads,
                       memory_limit=budget) as executor:
        for i, (inp, out) in enumerate(pairs, 1):
            outcome = _one(inp, out, options, executor, bvals, bvecs)
            outcomes.append(outcome)
            say(f"p2s-dask: [{i}/{len(pairs)}] {outcome.status} {out}"
                + (f" ({outcome.seconds:.1f} s)" if outcome.status == "denoised" else "")
                + (f": {outcome.message}" if outcome.message else ""))
    return outcomes


def _one(inp, out, options, executor, bvals, bvecs) -> Outcome:
    if not options.overwrite and already_done(inp, out, options):
        return Outcome(str(inp), str(out), "skipped", message="already done")
    start = time.perf_counter()
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        denoise_file(inp, out, bvals=bvals, bvecs=bvecs, options=options,
                     executor=executor)
    except InputError as exc:
        return Outcome(str(inp), str(out), "failed", message=str(exc))
    return Outcome(str(inp), str(out), "denoised", time.perf_counter() - start)


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
