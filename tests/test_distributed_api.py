"""``patch2self`` on NumPy data with a ``dask.distributed`` Client active.

Tasks run in worker processes there, so a task that wrote into the caller's
array would leave it uninitialised (it did, for integer outputs). The result
must be the one computed without a Client, bit for bit, and right, whatever
ran in this process before: BLAS's thread count, which changes the last bits,
is the process's, and for a while tasks here ran on two threads after other
tests had left a pool thread in control of it (see :mod:`p2s_dask.run.threads`).
"""

import contextlib
import threading

import dask
import numpy as np
import pytest

from p2s_dask import patch2self
from p2s_dask.run import inmemory
from p2s_dask.testing.reference import reference_patch2self

distributed = pytest.importorskip("distributed")

SHAPE = (14, 12, 8)
BVALS = np.array([0, 0] + [1000] * 6 + [2000] * 6, float)
# spatial chunks of the statistics pass, so that blocks, their halos and the
# merge of their statistics cross the two workers: 2 x 2 x 2 blocks for
# radius 0, 2 blocks for radius 1 (whose halos make many small tasks)
SPLIT = {0: (7, 6, 4), 1: (14, 12, 4)}
# signal level and noise per dtype: inside each type's range with room for
# the denoised values
LEVELS = {"int8": (90, 4), "uint8": (180, 8), "int16": (1000, 40),
          "uint16": (3000, 120), "int32": (100_000, 4000),
          "float32": (1000, 40), "float64": (1000, 40)}


def phantom(dtype, seed=5):
    """Smooth anatomy times a per-volume attenuation plus Gaussian noise."""
    rng = np.random.default_rng(seed)
    level, noise = LEVELS[np.dtype(dtype).name]
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in SHAPE], indexing="ij")
    anat = 0.55 + 0.3 * np.cos(2 * x) * np.cos(1.5 * y) + 0.15 * z
    atten = np.where(BVALS > 50, rng.uniform(0.3, 0.7, BVALS.size), 1.0)
    data = level * anat[..., None] * atten + rng.normal(0, noise, SHAPE + (BVALS.size,))
    if np.issubdtype(dtype, np.integer):
        data = np.rint(data)
    return data.astype(dtype)


def brain_mask():
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in SHAPE], indexing="ij")
    return x**2 + y**2 + z**2 < 0.8


def local(data, **kw):
    """The answer without any Client: Dask's threaded scheduler."""
    with dask.config.set(scheduler="threads"):
        return patch2self(data, BVALS, **kw)


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(processes=True, n_workers=2, threads_per_worker=1,
                                  host="127.0.0.1", dashboard_address=None,
                                  # no dashboard; the scheduler's health
                                  # checks on a free loopback port (8787
                                  # may be taken)
                                  scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
                                  silence_logs=40) as cluster, \
            distributed.Client(cluster) as c:
        yield c


@pytest.mark.parametrize("radius", [0, 1])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("dtype", list(LEVELS))
def test_client_result_equals_local_bit_for_bit(client, dtype, masked, radius):
    data = phantom(dtype)
    kw = dict(out_dtype=dtype, patch_radius=radius, version=1 if radius else 3,
              mask=brain_mask() if masked else None, chunks=SPLIT[radius])
    expected = local(data, **kw)
    got = patch2self(data, BVALS, **kw)  # the Client is Dask's scheduler now
    assert got.dtype == np.dtype(dtype)
    assert np.array_equal(got, expected)


@pytest.mark.parametrize("order,dtype", [("C", "int16"), ("F", "float32")])
def test_client_default_chunks_and_prediction_pieces(client, order, dtype, monkeypatch):
    """One block (default chunks); then prediction pieces smaller than the
    blocks, cut from the scattered blocks on the workers. C-ordered data, and
    F-ordered (volume-major, as nibabel's ``get_fdata`` gives)."""
    data = np.asarray(phantom(dtype), order=order)
    assert np.array_equal(patch2self(data, BVALS), local(data))
    # pieces of a (14, 12, 4) block: 2 x-planes (C); 1 z-plane and half the y (F)
    monkeypatch.setattr(inmemory, "PIECE_BYTES", 2 * 12 * 4 * 8 * BVALS.size)
    kw = dict(patch_radius=1, version=1, chunks=SPLIT[1])
    assert np.array_equal(patch2self(data, BVALS, **kw), local(data, **kw))


def test_client_result_matches_reference(client):
    """Right, not only the same: the per-volume least-squares reference."""
    data = phantom("float64")
    mask = brain_mask()
    got = patch2self(data, BVALS, patch_radius=1, version=1, mask=mask, chunks=SPLIT[1])
    ref = reference_patch2self(data, BVALS, patch_radius=1, mask=mask)
    err = np.abs(got - ref).max() / np.ptp(data)
    assert err <= 1e-6, f"max error {err:.2e} of the data range"


def test_configured_local_scheduler_is_honoured(client):
    """``dask.config.set(scheduler=...)`` wins over the Client, as in
    ``dask.compute``."""
    data = phantom("int16")
    with dask.config.set(scheduler="sync"):
        got = patch2self(data, BVALS, chunks=SPLIT[0])
    assert np.array_equal(got, local(data, chunks=SPLIT[0]))


def test_patch_lanes_equal_local_bit_for_bit(client):
    """Radius 1 with enough volumes that the statistics are summed in lanes
    (one F x F scatter per chain of blocks): the lanes, like the chunks, come
    from the budget alone, so a cluster sums in the same order as threads."""
    from p2s_dask.graph.engine import SMALL_SCATTER_BYTES, in_memory_sizes

    rng = np.random.default_rng(11)
    shape, n = (20, 20, 12), 80
    bvals = np.array([0, 0] + [1000] * (n - 2), float)
    anat = 500 + 300 * rng.random(shape)
    data = anat[..., None] * np.where(bvals > 50, rng.uniform(0.3, 0.7, n), 1.0)
    data = data + rng.normal(0, 20, shape + (n,))
    widest = (n - 2) * 27
    assert widest * widest * 8 > SMALL_SCATTER_BYTES  # summed in lanes ...
    assert in_memory_sizes(shape + (n,), (1, 1, 1))[1] >= 2  # ... more than one
    kw = dict(patch_radius=1, version=1, chunks=(20, 20, 3))
    with dask.config.set(scheduler="threads"):
        expected = patch2self(data, bvals, **kw)
    with distributed.get_task_stream(client) as ts:
        got = patch2self(data, bvals, **kw)
    # the work ran on the cluster's workers, not in this process
    assert any("_lane_step" in str(t["key"]) for t in ts.data)
    assert np.array_equal(got, expected)


def test_explicit_executor_equals_local(client):
    """``denoise_into`` on an executor handed to it (the cluster's, while
    ``dask.compute`` would use threads) gives the threads' bytes."""
    from p2s_dask.config.groups import make_groups
    from p2s_dask.graph.engine import DenoiseSpec
    from p2s_dask.run.executors import DistributedExecutor
    from p2s_dask.run.threads import single_threaded_blas

    data = phantom("int16")
    spec = DenoiseSpec(make_groups(BVALS, BVALS.size), (1, 1, 1), mask=brain_mask())
    expected = local(data, patch_radius=1, version=1, mask=brain_mask(), chunks=SPLIT[1])
    got = np.empty(data.shape, np.int16)
    # as patch2self: BLAS on one thread here too (the solve runs here)
    with dask.config.set(scheduler="threads"), single_threaded_blas():
        inmemory.denoise_into(data, got, spec, chunks=SPLIT[1],
                              executor=DistributedExecutor(client))
    assert np.array_equal(got, expected)


@pytest.mark.parametrize("order", ["F", "C"])
def test_scattered_float64_blocks_equal_local_bit_for_bit(client, order):
    """Volume-major float64 data in several blocks, at radius 0 (blocks go to
    the statistics without a halo copy). A scattered block arrives on its
    worker in a network buffer at any byte offset; NumPy sums unaligned
    values in another order, which changed the last bits of the statistics
    until the blocks were realigned on the workers."""
    rng = np.random.default_rng(3)
    shape, n = (64, 64, 40), 40
    bvals = np.array([0, 0] + [1000] * 19 + [2000] * 19, float)
    anat = 600 + 300 * rng.random(shape)
    data = anat[..., None] * np.where(bvals > 50, rng.uniform(0.3, 0.7, n), 1.0)
    data = np.asarray(data + rng.normal(0, 40, shape + (n,)), order=order)
    kw = dict(chunks=(64, 64, 20))  # two blocks of 10 MiB
    with dask.config.set(scheduler="threads"):
        expected = patch2self(data, bvals, **kw)
    assert np.array_equal(patch2self(data, bvals, **kw), expected)


def _at_offset(data, offset):
    """A copy of ``data`` (same layout) starting ``offset`` bytes past a
    64-byte boundary."""
    order = "F" if data.flags.f_contiguous and not data.flags.c_contiguous else "C"
    raw = np.empty(data.nbytes + 128, np.uint8)
    start = (-raw.ctypes.data) % 64 + offset
    out = raw[start:start + data.nbytes].view(data.dtype).reshape(data.shape, order=order)
    out[...] = data
    return out


@pytest.mark.parametrize("case", ["float64-mask-1", "lanes", "F-blocks"])
def test_local_bits_do_not_depend_on_the_process_state(case):
    """What a process's history may change, changed on purpose: where the
    data sit (a heap that served other runs gives other addresses, and SIMD
    loops may take another path at another alignment), the caller's BLAS
    thread count, the local scheduler. A worker process of a cluster starts
    fresh, so each of these would show as a cluster result differing from a
    local one in the last bits (as these tests once did after the rest of
    the suite ran in the same process). (Dask's ``num_workers`` is not one
    of them: the lanes follow it by design, on every executor alike, see
    ``graph.engine.in_memory_sizes``.)"""
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(11)
    if case == "float64-mask-1":
        data, bvals = phantom("float64"), BVALS
        kw = dict(out_dtype="float64", patch_radius=1, version=1, mask=brain_mask(),
                  chunks=SPLIT[1])
    elif case == "lanes":
        shape, n = (20, 20, 12), 80
        bvals = np.array([0, 0] + [1000] * (n - 2), float)
        data = (500 + 300 * rng.random(shape))[..., None] * np.where(
            bvals > 50, rng.uniform(0.3, 0.7, n), 1.0) + rng.normal(0, 20, shape + (n,))
        kw = dict(patch_radius=1, version=1, chunks=(20, 20, 3))
    else:
        shape, n = (32, 32, 20), 40
        bvals = np.array([0, 0] + [1000] * 19 + [2000] * 19, float)
        data = (600 + 300 * rng.random(shape))[..., None] * np.where(
            bvals > 50, rng.uniform(0.3, 0.7, n), 1.0) + rng.normal(0, 40, shape + (n,))
        data, kw = np.asfortranarray(data), dict(chunks=(32, 32, 10))
    with dask.config.set(scheduler="threads"):
        expected = patch2self(_at_offset(data, 0), bvals, **kw)
    variants = [(8, 1, "threads"), (24, 2, "threads"), (40, 2, "sync"), (56, 1, "sync")]
    for offset, blas, scheduler in variants:
        with dask.config.set(scheduler=scheduler), threadpool_limits(blas, user_api="blas"):
            got = patch2self(_at_offset(data, offset), bvals, **kw)
        assert np.array_equal(got, expected), (offset, blas, scheduler)


def _blas_counts():
    from threadpoolctl import threadpool_info
    return sorted({i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"})


@contextlib.contextmanager
def _another_thread_holds_blas(threads):
    """A live thread of this process that set BLAS's count outside a ``with``
    block, as the tasks once did: since threadpoolctl 3.8 it then controls
    OpenBLAS's process-wide count, and other threads' settings are ignored."""
    from threadpoolctl import threadpool_limits

    before = _blas_counts()[-1]
    held, done = threading.Event(), threading.Event()

    def hold():
        threadpool_limits(threads, user_api="blas")
        held.set()
        done.wait()
        threadpool_limits(before, user_api="blas")  # the process as it was

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    held.wait()
    try:
        yield
    finally:
        done.set()
        holder.join()


def test_tasks_run_on_one_blas_thread_whoever_held_it(client):
    """With another thread of this process in control of BLAS at 2 threads
    (what other tests left behind when the defect showed), the local run's
    tasks still run on one BLAS thread, and the cluster's bits match them."""
    from dask.callbacks import Callback

    data = phantom("float64")
    kw = dict(out_dtype="float64", patch_radius=1, version=1, mask=brain_mask(),
              chunks=SPLIT[1])
    seen = []
    with _another_thread_holds_blas(2):
        assert _blas_counts() == [2]
        with Callback(pretask=lambda *a: seen.append(_blas_counts())):
            expected = local(data, **kw)
        got = patch2self(data, BVALS, **kw)
    assert seen and all(c == [1] for c in seen), seen
    assert np.array_equal(got, expected)


def test_tasks_leave_the_process_count_to_its_owner():
    """Tasks computed where nobody holds BLAS's count (a graph of the Dask
    layer computed directly) set it only inside their own ``with`` block:
    afterwards this thread's own limit still takes effect. (A task that
    kept control, as once, left every later setting of the caller ignored.)"""
    from threadpoolctl import threadpool_limits

    import threadpoolctl

    from p2s_dask.config.groups import make_groups
    from p2s_dask.graph.engine import DenoiseSpec, as_chunked, denoise

    clear = getattr(threadpoolctl.OpenBLASController, "clear_controlling_thread", None)
    if clear is not None:  # threadpoolctl >= 3.8: nobody controls it now
        clear(force=True)
    data = phantom("float64")
    spec = DenoiseSpec(make_groups(BVALS, BVALS.size), (1, 1, 1), mask=brain_mask())
    with threadpool_limits(2, user_api="blas"):
        pass  # the process at 2: tasks then set their own count
    denoise(as_chunked(data, SPLIT[1], (1, 1, 1)), spec).compute(scheduler="threads")
    with threadpool_limits(3, user_api="blas"):
        assert _blas_counts() == [3]


def test_worker_processes_hold_one_blas_thread(monkeypatch):
    """Workers started without the nanny's OPENBLAS_NUM_THREADS=1 and with
    two threads each: the executor pins each worker process at one BLAS
    thread for its life (per task, two threads' settings would restore each
    other's), and the bits are the local ones."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)  # left here by earlier nannies
    data = phantom("float64")
    kw = dict(out_dtype="float64", patch_radius=1, version=1, mask=brain_mask(),
              chunks=SPLIT[1])
    expected = local(data, **kw)
    with dask.config.set({"distributed.nanny.pre-spawn-environ": {}}), \
            distributed.LocalCluster(processes=True, n_workers=1, threads_per_worker=2,
                                     host="127.0.0.1", dashboard_address=None,
                                     scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
                                     silence_logs=40) as cluster, \
            distributed.Client(cluster) as c:
        before = list(c.run(_blas_counts).values())
        got = patch2self(data, BVALS, **kw)
        after = list(c.run(_blas_counts).values())
    assert before != [[1]]  # the workers started on more than one thread ...
    assert after == [[1]]  # ... and run on one
    assert np.array_equal(got, expected)
