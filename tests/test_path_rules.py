"""The manifest's rules, one per test, for every path-valued option against
every input role: refused up front with one line, inputs byte-identical,
nothing written."""

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from p2s_dask.fronts.cli import main

from test_faults import BVALS, write_dwi


def _files(root):
    return {p: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


@pytest.fixture()
def inputs(tmp_path):
    """Every input role, each its own file: IN and its sidecars, explicit
    gradient files, a mask, a groups file."""
    d = tmp_path / "d"
    d.mkdir()
    write_dwi(d / "dwi.nii.gz", shape=(8, 7, 6))
    (d / "dwi.json").write_text(json.dumps({"EchoTime": 0.08}))
    x = tmp_path / "x"
    x.mkdir()
    np.savetxt(x / "b.bval", BVALS[None], fmt="%g")
    np.savetxt(x / "b.bvec", np.tile([[0.0], [1.0], [0.0]], (1, BVALS.size)), fmt="%g")
    mask = np.zeros((8, 7, 6), np.uint8)
    mask[1:7, 1:6, 1:5] = 1
    nib.save(nib.Nifti1Image(mask, np.diag([2.0, 2.0, 2.0, 1.0])), str(x / "mask.nii.gz"))
    (x / "groups.txt").write_text(" ".join(["0"] * 3 + ["1"] * 17) + "\n")
    return {"input": d / "dwi.nii.gz", "input .bval": d / "dwi.bval",
            "input .bvec": d / "dwi.bvec", "input .json": d / "dwi.json",
            "--bvals": x / "b.bval", "--bvecs": x / "b.bvec", "--mask": x / "mask.nii.gz",
            "--groups": x / "groups.txt"}


def _reads(inputs):
    """The read options, each naming its own file."""
    return ["--bvals", inputs["--bvals"], "--bvecs", inputs["--bvecs"],
            "--mask", inputs["--mask"], "--groups", inputs["--groups"]]


# how each writing option points at a place: (argv builder)
WRITERS = {
    "OUT": lambda i, p, o: ["denoise", i, p],
    "--report-json": lambda i, p, o: ["denoise", i, o, "--report-json", p],
    "--log-file": lambda i, p, o: ["denoise", i, o, "--log-file", p],
    "--tmp-dir": lambda i, p, o: ["denoise", i, o, "--tmp-dir", p],
    "--out-dir": lambda i, p, o: ["denoise", i, "--out-dir", p],
}


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("role", ["input", "input .bval", "input .bvec", "input .json",
                                  "--bvals", "--bvecs", "--mask", "--groups"])
@pytest.mark.parametrize("writer", list(WRITERS))
def test_no_option_writes_over_an_input(inputs, tmp_path, capsys, writer, role, overwrite):
    target = inputs[role]
    out = tmp_path / "o.nii.gz"
    argv = WRITERS[writer](inputs["input"], target, out) + _reads(inputs) + ["--quiet"]
    argv += ["--overwrite"] * overwrite
    before = _files(tmp_path)
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("p2s-dask: error:") and "\n" not in err, err
    assert str(target.name) in err or str(target) in err, err
    assert _files(tmp_path) == before  # inputs byte-identical, nothing new


@pytest.mark.parametrize("writer", ["--report-json", "--log-file"])
@pytest.mark.parametrize("which", ["OUT", "OUT's .json", "OUT's .bval"])
def test_front_files_never_replace_the_output(inputs, tmp_path, capsys, writer, which):
    out = tmp_path / "o.nii.gz"
    target = {"OUT": out, "OUT's .json": tmp_path / "o.json",
              "OUT's .bval": tmp_path / "o.bval"}[which]
    argv = WRITERS[writer](inputs["input"], target, out) + ["--quiet"]
    before = _files(tmp_path)
    assert main([str(a) for a in argv]) == 2
    assert "same place" in capsys.readouterr().err
    assert _files(tmp_path) == before


def test_reading_options_never_name_the_output(inputs, tmp_path, capsys):
    """OUT (or its sidecar) named as the mask, the gradients or the groups."""
    out = tmp_path / "o.nii.gz"
    for flag, target in (("--mask", out), ("--bvals", tmp_path / "o.bval"),
                         ("--bvecs", tmp_path / "o.bvec"), ("--groups", tmp_path / "o.json")):
        target.write_bytes(b"x")
        before = _files(tmp_path)
        assert main(["denoise", str(inputs["input"]), str(out), flag, str(target),
                     "--overwrite", "--quiet"]) == 2
        assert "never writes over what it reads" in capsys.readouterr().err
        assert _files(tmp_path) == before
        target.unlink()


def test_report_into_a_missing_folder_is_refused_before_the_run(inputs, tmp_path, capsys):
    out = tmp_path / "o.nii.gz"
    assert main(["denoise", str(inputs["input"]), str(out), "--report-json",
                 str(tmp_path / "nowhere" / "r.json"), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not out.exists() and not Path(str(out) + ".p2s-work").exists()


def test_existing_report_needs_overwrite_and_is_then_replaced(inputs, tmp_path, capsys):
    out, report = tmp_path / "o.nii.gz", tmp_path / "r.json"
    report.write_text("mine")
    assert main(["denoise", str(inputs["input"]), str(out), "--report-json", str(report),
                 "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err and report.read_text() == "mine"
    assert not out.exists()
    assert main(["denoise", str(inputs["input"]), str(out), "--report-json", str(report),
                 "--overwrite", "--quiet"]) == 0
    assert json.loads(report.read_text())["output"] == str(out)


def test_batch_collision_is_refused_before_any_work(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    write_dwi(a / "dwi.nii.gz", shape=(8, 7, 6), seed=1)
    write_dwi(b / "dwi.nii.gz", shape=(8, 7, 6), seed=2)
    out = tmp_path / "out"
    for extra in ([], ["--overwrite"]):
        assert main(["denoise", str(a / "dwi.nii.gz"), str(b / "dwi.nii.gz"), "--out-dir",
                     str(out), "--quiet", *extra]) == 2
        err = capsys.readouterr().err
        assert "would both write" in err and "\n" not in err.strip(), err
        assert not out.exists()


def test_batch_output_over_another_runs_input_is_refused(tmp_path, capsys):
    a, out = tmp_path / "a", tmp_path / "out"
    a.mkdir(), out.mkdir()
    write_dwi(a / "dwi.nii.gz", shape=(8, 7, 6), seed=1)
    write_dwi(out / "other.nii.gz", shape=(8, 7, 6), seed=2)
    (a / "other.nii.gz").symlink_to(a / "dwi.nii.gz")
    before = _files(tmp_path)
    # a/other.nii.gz -> out/other.nii.gz, which is the second run's input
    assert main(["denoise", str(a / "other.nii.gz"), str(out / "other.nii.gz"),
                 "--out-dir", str(out), "--overwrite", "--quiet"]) == 2
    assert "never writes over what it reads" in capsys.readouterr().err
    assert _files(tmp_path) == before


def test_bvals_with_out_dir_are_used(tmp_path, capsys):
    """--bvals given with --out-dir rules over a wrong .bval beside the input."""
    d = tmp_path / "d"
    d.mkdir()
    write_dwi(d / "dwi.nii.gz", shape=(8, 7, 6))
    good = tmp_path / "good.bval"
    good.write_text((d / "dwi.bval").read_text())
    (d / "dwi.bval").write_text(" ".join(["0"] * 10 + ["1000"] * 10) + "\n")  # wrong
    single = tmp_path / "single.nii.gz"
    assert main(["denoise", str(d / "dwi.nii.gz"), str(single), "--bvals", str(good),
                 "--quiet"]) == 0
    assert main(["denoise", str(d / "dwi.nii.gz"), "--out-dir", str(tmp_path / "o"),
                 "--bvals", str(good), "--quiet"]) == 0
    np.testing.assert_array_equal(
        nib.load(str(single)).get_fdata(),
        nib.load(str(tmp_path / "o" / "dwi.nii.gz")).get_fdata())
    assert (tmp_path / "o" / "dwi.bval").read_text() == (tmp_path / "single.bval").read_text()


def test_out_dir_that_is_a_file_is_one_line(inputs, tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    assert main(["denoise", str(inputs["input"]), "--out-dir", str(f), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "is a file" in err and "\n" not in err


def test_a_lost_double_slash_is_never_a_local_folder(inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["denoise", str(inputs["input"]), "s3:/bucket/o.nii.gz", "--quiet"]) == 2
    assert "s3:" in capsys.readouterr().err
    assert not (tmp_path / "s3:").exists()


def test_abbreviations_are_not_options(inputs, tmp_path, capsys):
    """A prefix is never taken for a longer option (argparse's prefix
    matching is off): --report-j is not --report-json, --patch not
    --patch-radius."""
    out = tmp_path / "o.nii.gz"
    for flag, value in (("--report-j", str(tmp_path / "r.json")), ("--patch", "1"),
                        ("--memory", "1GiB")):
        assert main(["denoise", str(inputs["input"]), str(out), flag, value,
                     "--quiet"]) == 2
        assert f"unrecognized arguments: {flag}" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists() and not out.exists()


def test_an_unknown_protocol_is_one_line_naming_the_option(inputs, tmp_path, capsys):
    assert main(["denoise", str(inputs["input"]), "foo://x/o.nii.gz", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("p2s-dask: error: OUT (foo://x/o.nii.gz): unknown URL protocol")
    assert main(["denoise", str(inputs["input"]), str(tmp_path / "o.nii.gz"),
                 "--report-json", "foo://x/r.json", "--quiet"]) == 2
    assert "--report-json (foo://x/r.json): unknown URL protocol" in capsys.readouterr().err
    assert not (tmp_path / "o.nii.gz").exists()
