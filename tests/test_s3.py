"""``p2s-dask`` with data in S3: a moto server on 127.0.0.1, fake credentials.

Denoising s3 -> s3 (NIfTI and Zarr) and s3 -> local gives the local run's
output; credentials work from ``--storage-options`` and from the usual AWS
environment variables (botocore honours ``AWS_ENDPOINT_URL``); ``convert``
goes both ways. Missing buckets and keys, wrong credentials and denied
access end with exit code 2 and one line on stderr. For the last two, moto
checks signatures and IAM policies only while its IAM authentication is
switched on, which :func:`moto.core.enable_iam_authentication` does for the
server running in this process.
"""

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from p2s_dask.fronts.cli import main
from p2s_dask.io import open_dwi

s3fs = pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

# moto keeps its buckets in this process's memory, shared by every server it
# starts: a name of our own keeps other test modules' buckets apart
BUCKET = "p2s-test-s3"


@pytest.fixture(scope="module")
def s3(small_dwi, tmp_path_factory):
    """A moto S3 server holding the small DWI as NIfTI (+ .bval/.bvec) and Zarr.

    Yields
    ------
    dict
        ``fs`` (an s3fs file system), ``options`` (storage options with the
        endpoint and fake credentials), ``endpoint``.
    """
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    # no region_name: s3fs would send it as the bucket's LocationConstraint,
    # which S3 (and moto) refuse for us-east-1
    options = {"key": "testing", "secret": "testing",
               "client_kwargs": {"endpoint_url": endpoint}}
    fs = s3fs.S3FileSystem(**options)
    fs.mkdir(BUCKET)
    stem = str(small_dwi).removesuffix(".nii.gz")
    for ext in (".nii.gz", ".bval", ".bvec"):
        fs.put(stem + ext, f"{BUCKET}/in/dwi{ext}")
    # the Zarr input is made locally by the command line, then uploaded as is
    local_zarr = tmp_path_factory.mktemp("zarr") / "dwi.zarr"
    assert main(["convert", str(small_dwi), str(local_zarr), "--quiet"]) == 0
    fs.put(str(local_zarr), f"{BUCKET}/in/dwi.zarr", recursive=True)
    try:
        yield {"fs": fs, "options": options, "endpoint": endpoint}
    finally:
        server.stop()


@pytest.fixture(scope="module")
def local_result(small_dwi, tmp_path_factory):
    """The denoised small DWI, computed from the local file."""
    out = tmp_path_factory.mktemp("local") / "den.nii.gz"
    assert main(["denoise", str(small_dwi), str(out), "--quiet"]) == 0
    return np.asanyarray(nib.load(out).dataobj)


def run(s3, *args, options=None):
    """``p2s-dask ARGS --quiet --storage-options OPTIONS`` in this process."""
    options = s3["options"] if options is None else options
    return main([str(a) for a in args] + ["--quiet", "--storage-options",
                                          json.dumps(options)])


def fetch_nifti(s3, key, tmp_path):
    local = tmp_path / os.path.basename(key)
    s3["fs"].get(f"{BUCKET}/{key}", str(local))
    return np.asanyarray(nib.load(local).dataobj)


def keys(s3, prefix):
    s3["fs"].invalidate_cache()
    return s3["fs"].find(f"{BUCKET}/{prefix}") if s3["fs"].exists(f"{BUCKET}/{prefix}") \
        else []


def test_nifti_s3_to_s3(s3, local_result, tmp_path):
    assert run(s3, "denoise", f"s3://{BUCKET}/in/dwi.nii.gz",
               f"s3://{BUCKET}/nn/den.nii.gz") == 0
    np.testing.assert_array_equal(fetch_nifti(s3, "nn/den.nii.gz", tmp_path), local_result)
    # the image and its sidecars, no work store left
    assert keys(s3, "nn") == [f"{BUCKET}/nn/den{e}" for e in (".bval", ".bvec", ".json",
                                                               ".nii.gz")]


def test_zarr_s3_to_s3(s3, local_result):
    assert run(s3, "denoise", f"s3://{BUCKET}/in/dwi.zarr", f"s3://{BUCKET}/zz/den.zarr") == 0
    values, meta = open_dwi(f"s3://{BUCKET}/zz/den.zarr", storage_options=s3["options"])
    np.testing.assert_array_equal(values.compute(), local_result)
    assert not any(".p2s-work" in k for k in keys(s3, "zz"))


@pytest.mark.parametrize("name", ["den.nii", "den.nii.gz", "den.zarr"])
def test_s3_to_local(s3, local_result, tmp_path, name):
    out = tmp_path / name
    assert run(s3, "denoise", f"s3://{BUCKET}/in/dwi.nii.gz", out) == 0
    got = open_dwi(out)[0].compute() if name.endswith(".zarr") else \
        np.asanyarray(nib.load(out).dataobj)
    np.testing.assert_array_equal(got, local_result)
    # the output (and a NIfTI's sidecars), nothing else: no work store
    sidecars = [] if name.endswith(".zarr") else ["den.bval", "den.bvec", "den.json"]
    assert sorted(os.listdir(tmp_path)) == sorted([name, *sidecars])


def aws_env(s3, **extra):
    """This environment without AWS/P2S settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "P2S_DASK_"))}
    env.update(extra)
    return env


def test_credentials_from_environment(s3, local_result, tmp_path):
    # a separate process: botocore reads the variables when a session starts,
    # and fsspec caches file systems per set of options
    env = aws_env(s3, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                  AWS_ENDPOINT_URL=s3["endpoint"])
    res = subprocess.run([sys.executable, "-m", "p2s_dask.fronts.cli", "denoise",
                          f"s3://{BUCKET}/in/dwi.nii.gz", f"s3://{BUCKET}/env/den.nii.gz",
                          "--quiet"], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    np.testing.assert_array_equal(fetch_nifti(s3, "env/den.nii.gz", tmp_path), local_result)


def test_convert_both_ways(s3, small_dwi, tmp_path):
    original = nib.load(small_dwi)
    # s3 NIfTI -> local Zarr (bvals from the .bval next to it in the bucket)
    assert run(s3, "convert", f"s3://{BUCKET}/in/dwi.nii.gz", tmp_path / "a.zarr") == 0
    values, meta = open_dwi(tmp_path / "a.zarr")
    np.testing.assert_array_equal(values.compute(), original.get_fdata())
    assert meta.bvals is not None and len(meta.bvals) == original.shape[3]
    # local Zarr -> s3 NIfTI -> back here: the same file content
    assert run(s3, "convert", tmp_path / "a.zarr", f"s3://{BUCKET}/cv/b.nii.gz") == 0
    s3["fs"].get(f"{BUCKET}/cv/b.nii.gz", str(tmp_path / "b.nii.gz"))
    back = nib.load(tmp_path / "b.nii.gz")
    np.testing.assert_array_equal(np.asanyarray(back.dataobj),
                                  np.asanyarray(original.dataobj))
    assert back.header.get_slope_inter() == original.header.get_slope_inter()
    # s3 Zarr -> local NIfTI, and local NIfTI -> s3 Zarr
    assert run(s3, "convert", f"s3://{BUCKET}/in/dwi.zarr", tmp_path / "c.nii") == 0
    np.testing.assert_array_equal(nib.load(tmp_path / "c.nii").get_fdata(),
                                  original.get_fdata())
    assert run(s3, "convert", small_dwi, f"s3://{BUCKET}/cv/d.zarr") == 0
    values, _ = open_dwi(f"s3://{BUCKET}/cv/d.zarr", storage_options=s3["options"])
    np.testing.assert_array_equal(values.compute(), original.get_fdata())


def one_line_error(capsys):
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("p2s-dask: error:"), err
    assert "\n" not in err and "Traceback" not in err
    return err


def test_missing_bucket_and_key(s3, capsys, tmp_path):
    assert run(s3, "denoise", "s3://no-such-bucket/dwi.nii.gz",
               f"s3://{BUCKET}/mb/den.nii.gz") == 2
    err = one_line_error(capsys)
    assert "not found" in err and "bucket no-such-bucket" in err
    assert run(s3, "denoise", f"s3://{BUCKET}/in/nope.nii.gz",
               f"s3://{BUCKET}/mb/den.nii.gz") == 2
    assert "input not found" in one_line_error(capsys)
    # a missing output bucket is an error, not a new bucket
    for out in ("s3://no-such-bucket/den.nii.gz", "s3://no-such-bucket/den.zarr"):
        assert run(s3, "denoise", f"s3://{BUCKET}/in/dwi.nii.gz", out) == 2
        assert "bucket does not exist" in one_line_error(capsys)
    assert run(s3, "convert", f"s3://{BUCKET}/in/nope.nii.gz", tmp_path / "x.zarr") == 2
    assert "no such file" in one_line_error(capsys)
    assert run(s3, "convert", f"s3://{BUCKET}/in/dwi.zarr",
               "s3://no-such-bucket/x.nii.gz") == 2
    assert "bucket does not exist" in one_line_error(capsys)
    s3["fs"].invalidate_cache()
    assert not s3["fs"].exists("no-such-bucket")
    assert keys(s3, "mb") == []
    assert not os.listdir(tmp_path)


@pytest.fixture
def iam_users(s3):
    """Credentials of two IAM users, and moto checking every request.

    ``full`` may do anything in S3; ``reader`` may only read. While this
    fixture is active, moto verifies signatures and policies.
    """
    import boto3
    from moto.core import enable_iam_authentication

    iam = boto3.client("iam", endpoint_url=s3["endpoint"], region_name="us-east-1",
                       aws_access_key_id="testing", aws_secret_access_key="testing")
    users = {}
    for role, actions in (("full", ["s3:*"]), ("reader", ["s3:GetObject", "s3:ListBucket"])):
        name = f"{BUCKET}-{role}"
        iam.create_user(UserName=name)
        iam.put_user_policy(UserName=name, PolicyName="s3", PolicyDocument=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        users[role] = {"key": key["AccessKeyId"], "secret": key["SecretAccessKey"],
                       "client_kwargs": s3["options"]["client_kwargs"]}
    try:
        with enable_iam_authentication():
            yield users
    finally:
        for role in users:
            name = f"{BUCKET}-{role}"
            for key in iam.list_access_keys(UserName=name)["AccessKeyMetadata"]:
                iam.delete_access_key(UserName=name, AccessKeyId=key["AccessKeyId"])
            iam.delete_user_policy(UserName=name, PolicyName="s3")
            iam.delete_user(UserName=name)


def test_credentials_and_permissions(s3, iam_users, capsys, tmp_path):
    src = f"s3://{BUCKET}/in/dwi.nii.gz"
    full, reader = iam_users["full"], iam_users["reader"]
    # the checks are on: valid credentials with the right to write succeed
    assert run(s3, "denoise", src, f"s3://{BUCKET}/iam/ok.zarr", options=full) == 0
    capsys.readouterr()
    # a wrong secret key, an unknown access key id
    for bad in ({**full, "secret": "wrong"}, {**full, "key": "AKIAUNKNOWN000000000"}):
        assert run(s3, "denoise", src, f"s3://{BUCKET}/iam/x.nii.gz", options=bad) == 2
        err = one_line_error(capsys)
        assert "credentials" in err or "access denied" in err
        assert run(s3, "convert", src, tmp_path / "x.zarr", options=bad) == 2
        err = one_line_error(capsys)
        assert "credentials" in err or "access denied" in err
    # valid credentials without the right to write
    for out in (f"s3://{BUCKET}/iam/ro.nii.gz", f"s3://{BUCKET}/iam/ro.zarr"):
        assert run(s3, "denoise", src, out, options=reader) == 2
        assert "access denied" in one_line_error(capsys)
    assert run(s3, "convert", src, f"s3://{BUCKET}/iam/ro2.zarr", options=reader) == 2
    assert "access denied" in one_line_error(capsys)
    # nothing was written but the successful run's output
    fs = s3fs.S3FileSystem(**full)
    assert sorted({k.split("/")[2] for k in fs.find(f"{BUCKET}/iam")}) == ["ok.zarr"]
    assert not os.listdir(tmp_path)
