"""Bad options are refused before anything is written, in one line, the same
way from every front (issue 17: validation before the work store; one budget).
"""

import logging
import os
import subprocess
import sys
import warnings

import dask.array as da
import nibabel as nib
import numpy as np
import pytest

from p2s_dask import InputError, patch2self
from p2s_dask.config.budget import MIN_MEMORY_ENV, MIN_MEMORY_LIMIT, parse_memory_limit
from p2s_dask.config.options import front
from p2s_dask.config.validate import STORED_DTYPES, check_out_dtype
from p2s_dask.fronts.cli import main
from p2s_dask.io import DwiMeta, nifti_to_zarr
from p2s_dask.run.pipeline import denoise_file

SHAPE = (6, 5, 4, 12)
# one b0 (passed through) and 11 diffusion volumes: 10 or more volumes, so
# no "fewer than 10 volumes" warning adds a line
BVALS = np.array([0] + [1000] * 11)
ERROR = "p2s-dask: error: "


@pytest.fixture(autouse=True)
def real_floor(monkeypatch):
    """The product's floor (the suite's conftest lowers it for small images),
    and a local run whatever the environment names."""
    monkeypatch.delenv(MIN_MEMORY_ENV, raising=False)
    monkeypatch.delenv("P2S_DASK_SCHEDULER", raising=False)
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)


@pytest.fixture
def dwi(tmp_path):
    """A small float32 NIfTI with its .bval sibling."""
    rng = np.random.default_rng(3)
    data = (500 + 40 * rng.standard_normal(SHAPE)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "dwi.nii"))
    np.savetxt(tmp_path / "dwi.bval", BVALS[None], fmt="%d")
    return tmp_path / "dwi.nii"


def one_error_line(capsys, argv):
    """Run the command; it must fail with exactly one line on stderr."""
    assert main([str(a) for a in argv] + ["--quiet"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(ERROR), captured.err
    assert captured.out == ""
    return lines[0][len(ERROR):]


BAD_OPTIONS = {
    "memory 1MiB": (["--memory-limit", "1MiB"], "below the least workable budget, 64 MiB"),
    "memory zero": (["--memory-limit", "0"], "below the least workable budget, 64 MiB"),
    "memory text": (["--memory-limit", "lots"], "is not an amount of memory"),
    "memory shared": (["--memory-limit", "100MiB", "--workers", "4"],
                      "leaves each worker 25 MiB, below the least workable budget"),
    "float16": (["--out-dtype", "float16"], "cannot be written to NIfTI or Zarr"),
    "bool": (["--out-dtype", "bool"], "the denoised values are real numbers"),
    "complex64": (["--out-dtype", "complex64"], "the denoised values are real numbers"),
    "no dtype": (["--out-dtype", "float3"], "is not a NumPy dtype"),
}


@pytest.mark.parametrize("name", list(BAD_OPTIONS))
@pytest.mark.parametrize("out_name", ["out.nii", "out.zarr"])
def test_bad_option_is_one_line_and_writes_nothing(tmp_path, dwi, capsys, name, out_name):
    args, words = BAD_OPTIONS[name]
    before = sorted(os.listdir(tmp_path))
    out = tmp_path / out_name
    message = one_error_line(capsys, ["denoise", dwi, out, *args])
    assert words in message
    assert args[0] in message  # the flag as the user typed it
    assert not out.exists() and not (tmp_path / f"{out_name}.p2s-work").exists()
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.parametrize("junk", [b"not a nifti file\n" * 40, bytes(range(256)) * 3])
def test_mask_that_is_not_nifti_is_one_line_without_nibabel_output(tmp_path, dwi, capsys,
                                                                   junk):
    mask = tmp_path / "mask.nii"
    mask.write_bytes(junk)
    before = sorted(os.listdir(tmp_path))
    # nibabel reports a bad header on its own logger (and may warn): watch both
    heard = []
    handler = logging.Handler(level=logging.DEBUG)
    handler.emit = heard.append
    nib_logger = logging.getLogger("nibabel.global")
    nib_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            message = one_error_line(capsys, ["denoise", dwi, tmp_path / "out.nii",
                                              "--mask", mask])
    finally:
        nib_logger.removeHandler(handler)
    assert message.startswith(f"--mask {mask} is not a readable NIfTI file")
    assert heard == [] and [str(w.message) for w in warned] == []
    assert sorted(os.listdir(tmp_path)) == before


def _normalised(message, value):
    """The message with the option and value spelled alike for every front."""
    for spelling in (f"--memory-limit {value}", f"memory_limit={value!r}"):
        message = message.replace(spelling, "<memory limit>")
    return message


@pytest.mark.parametrize("value", ["1MiB", "lots"])
def test_same_memory_message_from_denoise_convert_and_api(tmp_path, dwi, capsys, value):
    cli_denoise = one_error_line(capsys, ["denoise", dwi, tmp_path / "o.nii",
                                          "--memory-limit", value])
    cli_convert = one_error_line(capsys, ["convert", dwi, tmp_path / "o.zarr",
                                          "--memory-limit", value])
    api = []
    for call in (lambda: denoise_file(dwi, tmp_path / "o.nii", memory_limit=value),
                 lambda: nifti_to_zarr(dwi, tmp_path / "o.zarr", memory_limit=value,
                                       progress=False)):
        with pytest.raises(InputError) as info:
            call()
        api.append(str(info.value))
    assert api[0].startswith(f"memory_limit={value!r} ")
    assert cli_denoise.startswith(f"--memory-limit {value} ")
    texts = {_normalised(m, value) for m in [cli_denoise, cli_convert, *api]}
    assert len(texts) == 1 and "<memory limit>" in texts.pop()
    assert sorted(os.listdir(tmp_path)) == ["dwi.bval", "dwi.nii"]


def test_floor_is_the_least_workable_budget():
    assert parse_memory_limit(MIN_MEMORY_LIMIT) == MIN_MEMORY_LIMIT
    assert parse_memory_limit("2GiB") == 2 << 30
    # None and "auto" are the default: half of what the machine gives
    assert parse_memory_limit(None) == parse_memory_limit("auto") >= MIN_MEMORY_LIMIT
    for bad in (MIN_MEMORY_LIMIT - 1, "63MiB", -1, True, float("nan"), ""):
        with pytest.raises(InputError):
            parse_memory_limit(bad)
    with front("cli"), pytest.raises(InputError, match=r"^--memory-limit 63MiB is below"):
        parse_memory_limit("63MiB")


def test_stored_dtypes_are_what_the_writers_accept():
    """The list the validation allows is exactly what the NIfTI and Zarr
    writers' header (DwiMeta.for_values) accepts among numeric types."""
    meta = DwiMeta.for_array(SHAPE, np.float32)
    candidates = {np.dtype(t) for t in np.typecodes["All"] if t not in "OSUVMmacv"}
    for dtype in candidates:
        try:
            meta.for_values(dtype)
            writable = True
        except (InputError, ValueError):
            writable = False
        assert writable == (dtype in STORED_DTYPES), dtype
    # the byte order is the writers' business: either is accepted
    assert check_out_dtype(">f4", stored=True) == np.dtype(np.float32)


def test_api_keeps_in_memory_dtypes_but_not_complex_or_bool():
    data = (100 + 10 * np.random.default_rng(0).standard_normal(SHAPE)).astype(np.float32)
    assert patch2self(data, BVALS, out_dtype=np.float16).dtype == np.float16
    for out_dtype in (np.complex64, bool):
        with pytest.raises(InputError, match="^out_dtype=.*the denoised values are real"):
            patch2self(data, BVALS, out_dtype=out_dtype)


@pytest.mark.parametrize("make", [lambda d: d.astype(np.complex64),
                                  lambda d: da.from_array(d.astype(np.complex128)),
                                  lambda d: d > 100])
def test_api_refuses_data_that_is_not_real_numbers(make):
    data = (100 + 10 * np.random.default_rng(1).standard_normal(SHAPE)).astype(np.float32)
    with pytest.raises(InputError, match=r"^data type (complex|bool)\w* is not supported: "
                                         r"use an integer or real float type$"):
        patch2self(make(data), BVALS)


def test_cli_warns_when_the_mask_has_fewer_voxels_than_regressors(tmp_path, dwi):
    """As the API warns: one ``p2s-dask: warning:`` line, then the run."""
    mask = np.zeros(SHAPE[:3], np.uint8)
    mask[0, 0, 0] = mask[2, 3, 1] = 1
    nib.save(nib.Nifti1Image(mask, np.eye(4)), str(tmp_path / "mask.nii.gz"))
    out = tmp_path / "out.nii"
    # a fresh process: the command's own warning output, not pytest's capture
    env = {k: v for k, v in os.environ.items() if k != MIN_MEMORY_ENV}
    res = subprocess.run([sys.executable, "-m", "p2s_dask.fronts.cli", "denoise", str(dwi),
                          str(out), "--mask", str(tmp_path / "mask.nii.gz"), "--quiet"],
                         capture_output=True, text=True, env=env, timeout=300)
    lines = res.stderr.splitlines()
    assert lines and all(line.startswith("p2s-dask: warning: ") for line in lines), res.stderr
    # the b0 group is a single volume, passed through: only the dwi group warns
    assert len(lines) == 1
    assert "dwi group is fitted on 2 voxels with 10 regressors" in lines[0]
    assert "interpolates the noise" in lines[0]
    assert res.returncode == 0 and out.exists(), res.stderr
