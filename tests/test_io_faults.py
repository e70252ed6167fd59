"""The I/O layer under real faults: full disks, lost object stores, kills.

Disks are size-limited tmpfs mounts (:mod:`faults`), so a full disk is the
kernel's ENOSPC; a lost endpoint is a moto server stopped mid-write; an
interrupted write is a process killed with SIGKILL. Every failure must end
in one line (``InputError``), never in a store marked complete, and never
leave a scratch file behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import dask.array as da
import nibabel as nib
import numpy as np
import pytest
import zarr

from faults import MotoS3, require_mount, small_disk
from p2s_dask.errors import InputError
from p2s_dask.io import DwiMeta, create_dwi_store, nifti_to_zarr, open_dwi, write_dwi, \
    zarr_to_nifti
from p2s_dask.io import nifti_zarr
from p2s_dask.io import scratch as scratch_module
from p2s_dask.io.urls import describe_error
from p2s_dask.io.zarr_store import (
    OutputExistsError,
    mark_complete,
    open_dwi_array,
    store_state,
    verify_all_chunks,
    write_region,
)

MiB = 1 << 20
# 4 MiB of float32 noise: Blosc cannot shrink it much, so it fills a 1-3 MiB disk
SHAPE = (32, 32, 16, 64)
CHUNKS = (16, 16, 8)


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message, message
    return message


def noise(seed=0, shape=SHAPE):
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


@pytest.fixture
def values():
    return da.from_array(noise(), chunks=(*CHUNKS, SHAPE[3]))


@pytest.fixture
def meta():
    return DwiMeta.for_array(SHAPE, np.float32)


@pytest.fixture
def noise_nii(tmp_path):
    """An uncompressed float32 NIfTI of noise (on the ordinary disk)."""
    path = tmp_path / "noise.nii"
    nib.save(nib.Nifti1Image(noise(1), np.eye(4)), str(path))
    return path


@pytest.fixture
def system_tmp(tmp_path, monkeypatch):
    """An empty folder standing in for $TMPDIR (and tempfile's cached choice)."""
    folder = tmp_path / "system-tmp"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folder))
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


# -- full disks ----------------------------------------------------------------

# the store takes 3828 KiB in 4 KiB pages (3.738 MiB); a disk of exactly
# that size holds every shard and the metadata, but not the root group that
# marking it complete writes while the pending state file still exists
@pytest.mark.parametrize("disk_mib", [1, 3.6, 3828 / 1024, 3.75, 8])
def test_write_dwi_full_disk(tmp_path, values, meta, disk_mib):
    """Whatever the room, either every chunk is there and the store is
    complete, or one line says the disk is full and nothing is complete."""
    require_mount()
    with small_disk(tmp_path / "disk", int(disk_mib * MiB)) as disk:
        url = str(disk / "out.zarr")
        try:
            write_dwi(values, url, meta)
        except InputError as exc:
            message = str(exc)
            assert "\n" not in message and message.startswith(f"writing {url}")
            assert "No space left" in message
            assert store_state(url) != "complete"
            assert not os.listdir(disk)  # removed: the room is given back
            assert disk_mib < 3.75, "this disk has room for the store"
        else:
            assert disk_mib > 3.6, "a disk this small cannot hold the store"
            assert store_state(url) == "complete"
            np.testing.assert_array_equal(open_dwi(url)[0].compute(), noise())


def test_write_dwi_lazy_full_disk(tmp_path, values, meta):
    require_mount()
    with small_disk(tmp_path / "disk", 2 * MiB) as disk:
        url = str(disk / "out.zarr")
        task = write_dwi(values, url, meta, compute=False)
        with pytest.raises(InputError) as err:
            task.compute()
        assert "No space left" in one_line(err)
        assert store_state(url) == "incomplete"


@pytest.mark.parametrize("memory_limit", ["2 GiB", "2 MiB"], ids=["one-slab", "scratch"])
def test_nifti_to_zarr_full_disk(tmp_path, noise_nii, memory_limit):
    require_mount()
    scratch_dir = tmp_path / "scratch"
    with small_disk(tmp_path / "disk", 2 * MiB) as disk:
        url = str(disk / "out.zarr")
        with pytest.raises(InputError) as err:
            nifti_to_zarr(noise_nii, url, chunks=(8, 8, 8), memory_limit=memory_limit,
                          tmp_dir=scratch_dir, progress=False)
        message = one_line(err)
        assert message.startswith(f"writing {url}") and "No space left" in message
        assert store_state(url) == "absent" and not os.listdir(disk)
    assert not scratch_dir.exists() or not os.listdir(scratch_dir)


# -- scratch files -------------------------------------------------------------

def spy_scratch(monkeypatch, step, folder, seen):
    """Record ``folder``'s files while ``nifti_zarr.<step>`` runs."""
    original = getattr(nifti_zarr, step)

    def spied(*args, **kwargs):
        seen.extend(os.listdir(folder))
        return original(*args, **kwargs)

    monkeypatch.setattr(nifti_zarr, step, spied)


@pytest.fixture
def scratch_paths(monkeypatch):
    """The conversions' scratch-file paths, which an object-store Zarr store
    (to it) and a store of another layout (from it) take: a local store of
    ours needs none (see test_local_stores_need_no_scratch)."""
    monkeypatch.setattr(nifti_zarr, "is_local", lambda url: False)
    monkeypatch.setattr(nifti_zarr, "reads_volumes", lambda array: False)


def test_local_stores_need_no_scratch(tmp_path, noise_nii, system_tmp, monkeypatch):
    """Into a local store volumes are appended to shards, out of one each
    slab reads its byte ranges: no scratch file either way, at any budget."""
    seen = []
    scratch_dir = tmp_path / "scratch"
    scratch_dir.mkdir()
    for step in ("_scratch_into_store", "_store_into_scratch"):
        spy_scratch(monkeypatch, step, scratch_dir, seen)
    monkeypatch.setattr(scratch_module.BlockScratch, "__init__", None)  # would fail
    nifti_to_zarr(noise_nii, tmp_path / "a.zarr", chunks=(8, 8, 8), memory_limit="2 MiB",
                  tmp_dir=scratch_dir, progress=False)
    zarr_to_nifti(tmp_path / "a.zarr", tmp_path / "b.nii", memory_limit="2 MiB",
                  tmp_dir=scratch_dir, progress=False)
    assert not seen and not os.listdir(scratch_dir) and not os.listdir(system_tmp)
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "b.nii").dataobj), noise(1))


def test_scratch_goes_to_tmp_dir(tmp_path, noise_nii, system_tmp, monkeypatch, scratch_paths):
    require_mount()
    seen = []
    with small_disk(tmp_path / "scratch", 6 * MiB) as scratch_dir:
        spy_scratch(monkeypatch, "_scratch_into_store", scratch_dir, seen)
        spy_scratch(monkeypatch, "_store_into_scratch", scratch_dir, seen)
        nifti_to_zarr(noise_nii, tmp_path / "a.zarr", chunks=(8, 8, 8),
                      memory_limit="2 MiB", tmp_dir=scratch_dir, progress=False)
        zarr_to_nifti(tmp_path / "a.zarr", tmp_path / "b.nii", memory_limit="2 MiB",
                      tmp_dir=scratch_dir, progress=False)
        assert not os.listdir(scratch_dir)  # deleted after use
    # one scratch file each way, in tmp_dir; nothing in the system's folder
    assert len(seen) == 2 and all(n.endswith(".scratch") for n in seen), seen
    assert not os.listdir(system_tmp)
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "b.nii").dataobj), noise(1))


def test_scratch_tmp_dir_created(tmp_path, noise_nii, system_tmp, scratch_paths):
    scratch_dir = tmp_path / "not" / "yet"
    nifti_to_zarr(noise_nii, tmp_path / "a.zarr", chunks=(8, 8, 8), memory_limit="2 MiB",
                  tmp_dir=f"file://{scratch_dir}", progress=False)
    assert scratch_dir.is_dir() and not os.listdir(scratch_dir)
    assert not os.listdir(system_tmp)


@pytest.mark.parametrize("reserve", [True, False], ids=["reserved", "sparse"])
def test_scratch_full_disk(tmp_path, noise_nii, system_tmp, monkeypatch, reserve,
                           scratch_paths):
    """A tmp_dir too small for the scratch file: one line naming the file and
    the room it needs, at creation (blocks reserved) or at the first write
    that finds no room (a file system that cannot reserve)."""
    require_mount()
    if not reserve:
        monkeypatch.setattr(scratch_module, "preallocate", lambda fd, offset, length: False)
    with small_disk(tmp_path / "scratch", 1 * MiB) as scratch_dir:
        for convert, src, dst in ((nifti_to_zarr, noise_nii, tmp_path / "a.zarr"),
                                  (zarr_to_nifti, tmp_path / "in.zarr", tmp_path / "b.nii")):
            if convert is zarr_to_nifti:
                nifti_to_zarr(noise_nii, src, chunks=(8, 8, 8), progress=False)
            with pytest.raises(InputError) as err:
                convert(src, dst, memory_limit="2 MiB", tmp_dir=scratch_dir, progress=False)
            message = one_line(err)
            assert f"scratch file {scratch_dir}{os.sep}p2s-dask-" in message
            assert "No space left" in message and "needs 4.00 MiB" in message
            assert not os.listdir(scratch_dir)
            assert not dst.exists()
    assert not os.listdir(system_tmp)


# -- verify_all_chunks -----------------------------------------------------------

def test_verify_all_chunks(tmp_path, meta):
    data = noise()
    data[:16] = 0  # half the chunks all zero: written all the same
    url = tmp_path / "out.zarr"
    write_dwi(da.from_array(data, chunks=(*CHUNKS, SHAPE[3])), url, meta)
    files = sorted(chunk_files(url))
    assert len(files) == 8
    verify_all_chunks(url)
    verify_all_chunks(open_dwi_array(url)[0])
    files[0].unlink()
    for target in (url, open_dwi_array(url)[0]):
        with pytest.raises(InputError) as err:
            verify_all_chunks(target)
        message = one_line(err)
        assert str(url) in message and "1 of its 8 chunks" in message
    with pytest.raises(InputError):
        mark_complete(url)


def test_zero_chunks_written_through_any_array(tmp_path, meta):
    """Array ``0`` opened by plain Zarr (empty chunks skipped by default)
    still stores all-zero shards through write_region (in its own axis
    order, t, z, y, x)."""
    url = tmp_path / "out.zarr"
    create_dwi_store(url, SHAPE, np.float32, CHUNKS, meta)
    plain = zarr.open_array(str(url), path="0", mode="r+")
    assert not plain.config.write_empty_chunks
    for i in range(0, SHAPE[0], CHUNKS[0]):
        for j in range(0, SHAPE[1], CHUNKS[1]):
            for k in range(0, SHAPE[2], CHUNKS[2]):
                region = (slice(None), slice(k, k + CHUNKS[2]), slice(j, j + CHUNKS[1]),
                          slice(i, i + CHUNKS[0]))
                write_region(plain, region, 0, str(url))
    mark_complete(url)
    assert store_state(url) == "complete"
    with pytest.raises(ValueError):
        write_region(plain, (slice(None), slice(1, 16)), 0, str(url))  # not aligned


# -- store_state -----------------------------------------------------------------

KILLED_WRITER = textwrap.dedent("""
    import sys, time
    import dask, dask.array as da, numpy as np
    from p2s_dask.io import DwiMeta, write_dwi
    shape = (32, 32, 16, 64)
    def slowly(block):
        time.sleep(0.2)
        return block
    values = da.ones(shape, dtype=np.float32, chunks=(8, 8, 8, 64)).map_blocks(slowly)
    with dask.config.set(scheduler="synchronous"):
        write_dwi(values, sys.argv[1], DwiMeta.for_array(shape, np.float32))
""")


def chunk_files(url):
    """The shard files of a store's array ``0`` (not our temporary ones)."""
    folder = url / "0" / "c"
    return [p for p in folder.rglob("*") if p.is_file() and not p.name.endswith(".partial")] \
        if folder.is_dir() else []


def killed_mid_write(url):
    """Start writing a store in another process; SIGKILL it after some chunks."""
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(url)])
    try:
        deadline = time.monotonic() + 60
        while len(chunk_files(url)) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, "writer ended early"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_store_state(tmp_path, values, meta):
    assert store_state(tmp_path / "none.zarr") == "absent"
    write_dwi(values, tmp_path / "done.zarr", meta)
    assert store_state(tmp_path / "done.zarr") == "complete"

    url = tmp_path / "killed.zarr"
    killed_mid_write(url)
    assert store_state(url) == "incomplete"
    with pytest.raises(InputError) as err:
        verify_all_chunks(url)
    assert "chunks were not written" in one_line(err)
    # valid but incomplete: it can be written to the end, then marked complete
    array, _ = open_dwi_array(url, require_complete=False, mode="r+")
    write_region(array, ..., 1, str(url))
    mark_complete(url)
    assert store_state(url) == "complete"
    assert float(open_dwi(url)[0].sum().compute()) == np.prod(SHAPE)


def invalid_stores(tmp_path, meta):
    """Things at a .zarr path that are not (or no longer) DWI stores."""
    cut = tmp_path / "cut.zarr"  # pending state cut short
    create_dwi_store(cut, SHAPE, np.float32, CHUNKS, meta)
    text = (cut / "p2s_dask_pending.json").read_text()
    (cut / "p2s_dask_pending.json").write_text(text[:len(text) // 2])
    cut_root = tmp_path / "cut-root.zarr"  # a finished store's group metadata cut short
    write_dwi(np.zeros(SHAPE, np.float32), cut_root, meta)
    text = (cut_root / "zarr.json").read_text()
    (cut_root / "zarr.json").write_text(text[:len(text) // 2])
    foreign = tmp_path / "foreign.zarr"  # a Zarr group without our attributes
    zarr.create_group(str(foreign), attributes={"something": "else"})
    no_array = tmp_path / "no-array.zarr"  # killed between group and array
    create_dwi_store(no_array, SHAPE, np.float32, CHUNKS, meta)
    (no_array / "0" / "zarr.json").unlink()
    bad_attrs = tmp_path / "bad-attrs.zarr"  # our format name, attributes missing
    create_dwi_store(bad_attrs, SHAPE, np.float32, CHUNKS, meta)
    (bad_attrs / "p2s_dask_pending.json").write_text(json.dumps(
        {"p2s_dask": {"format": "p2s-dask-dwi", "version": 2}}))
    empty = tmp_path / "empty.zarr"
    empty.mkdir()
    a_file = tmp_path / "file.zarr"
    a_file.write_bytes(b"not a store")
    return [cut, cut_root, foreign, no_array, bad_attrs, empty, a_file]


def test_store_state_invalid(tmp_path, meta):
    for url in invalid_stores(tmp_path, meta):
        assert store_state(url) == "invalid", url
        with pytest.raises(InputError) as err:
            open_dwi(url, require_complete=False)
        one_line(err)


# -- lost object store -----------------------------------------------------------

def test_s3_endpoint_lost_mid_write(values, meta):
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    s3 = MotoS3("p2s-test-faults").start()
    # one attempt per request: the test is about the message, not the retries
    options = s3.options(config_kwargs={"retries": {"max_attempts": 1}})
    url = "s3://p2s-test-faults/lost/out.zarr"
    written, lock = [0], threading.Lock()

    def stop_after_some(block):
        with lock:
            written[0] += 1
            if written[0] == 5:
                s3.stop()
        return block

    try:
        with pytest.raises(InputError) as err:
            write_dwi(values.map_blocks(stop_after_some), url, meta,
                      storage_options=options)
        message = one_line(err)
        assert message.startswith(f"writing {url}: cannot connect to the storage service")
        s3.start()  # moto kept what was written
        assert store_state(url, s3.options()) == "incomplete"
    finally:
        s3.stop()


# -- messages --------------------------------------------------------------------

def test_output_exists_is_neutral(tmp_path, values, meta, noise_nii):
    write_dwi(values, tmp_path / "a.zarr", meta)
    calls = [lambda: write_dwi(values, tmp_path / "a.zarr", meta),
             lambda: create_dwi_store(tmp_path / "a.zarr", SHAPE, np.float32, CHUNKS, meta),
             lambda: nifti_to_zarr(noise_nii, tmp_path / "a.zarr", progress=False),
             lambda: zarr_to_nifti(tmp_path / "a.zarr", noise_nii, progress=False)]
    for call in calls:
        with pytest.raises(OutputExistsError) as err:
            call()
        assert one_line(err).endswith(" already exists")
        assert "overwrite" not in str(err.value)


def test_wrapped_storage_errors():
    """Errors re-raised inside others (Zarr's and fsspec's async machinery,
    task wrappers, exception groups) are still recognised."""
    import errno

    def raised_inside(inner, outer, how):
        """``outer`` raised while handling ``inner``: as its context or cause."""
        try:
            try:
                raise inner
            except BaseException as exc:
                if how == "cause":
                    raise outer from exc
                raise outer
        except BaseException as exc:
            return exc

    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    quota = OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
    assert describe_error(raised_inside(full, RuntimeError("task failed"), "context")) == \
        "No space left on device"
    assert describe_error(raised_inside(quota, RuntimeError("task failed"), "cause")) == \
        "Disk quota exceeded"
    assert describe_error(ExceptionGroup("tasks", [KeyError("x"), OSError(
        errno.EIO, os.strerror(errno.EIO))])) == "Input/output error"
    botocore = pytest.importorskip("botocore.exceptions")
    lost = botocore.EndpointConnectionError(endpoint_url="http://127.0.0.1:1")
    assert describe_error(raised_inside(lost, RuntimeError("task failed"), "cause")).startswith(
        "cannot connect to the storage service")
    aiohttp = pytest.importorskip("aiohttp")
    assert describe_error(aiohttp.ServerDisconnectedError()).startswith("cannot connect")
    # a bug stays a bug, also when raised while handling another error
    try:
        try:
            raise ValueError("bug")
        except ValueError:
            raise KeyError("another bug") from None
    except KeyError as exc:
        assert describe_error(exc) is None
