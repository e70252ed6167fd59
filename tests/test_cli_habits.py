"""The command line in the field's habits: DIPY's spellings, flags, --help
defaults, --version, logging, --groups."""

import logging

import nibabel as nib
import numpy as np
import pytest

from p2s_dask import patch2self
from p2s_dask.fronts.cli import build_parser, main
from p2s_dask.config.options import option_fields

from test_faults import BVALS, write_dwi


def cli(*args):
    return main([str(a) for a in args] + ["--quiet"])


def test_version_prints_the_program_version(capsys):
    import p2s_dask
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"p2s-dask {p2s_dask.__version__}"


def test_help_shows_every_default():
    parser = build_parser()
    for name in ("denoise", "convert"):
        sub = parser._subparsers._group_actions[0].choices[name]
        for action in sub._actions:
            if not action.option_strings or action.dest in ("help",):
                continue
            text = sub._get_formatter()._expand_help(action) if action.help else ""
            assert "default" in text, f"{name} {action.option_strings}: {text!r}"


@pytest.mark.parametrize("ours,dipys", [
    (["--patch-radius", "1", "--ver", "1"], ["--patch_radius", "1", "--ver", "1"]),
    (["--no-b0-denoising", "--no-shift-intensity"],
     ["--skip_b0_denoising", "--skip_shift_intensity"]),
    (["--clip-negative-vals", "--b0-threshold", "100", "--out-dtype", "float32"],
     ["--clip_negative_vals", "--b0_threshold", "100", "--out_dtype", "float32"]),
])
def test_dipy_spellings_give_the_same_output(tmp_path, ours, dipys):
    inp = write_dwi(tmp_path / "dwi.nii.gz")
    a, b = tmp_path / "a.nii", tmp_path / "b.nii"
    assert cli("denoise", inp, a, *ours) == 0
    assert cli("denoise", inp, b, *dipys) == 0
    assert a.read_bytes() == b.read_bytes()
    # and the options really took effect: the same as the API with them
    img = nib.load(str(inp))
    kwargs = dict(patch_radius=1 if "1" in ours[:2] else 0,
                  version=1 if "--ver" in ours else 3,
                  b0_denoising="--no-b0-denoising" not in ours,
                  shift_intensity="--no-shift-intensity" not in ours,
                  clip_negative_vals="--clip-negative-vals" in ours,
                  b0_threshold=100 if "100" in ours else 50)
    api = patch2self(img.get_fdata(), BVALS, out_dtype=np.float32, **kwargs)
    got = np.asanyarray(nib.load(str(a)).dataobj)
    assert np.abs(got - api).max() <= 1e-4 * np.abs(api).max()


def test_force_is_overwrite(tmp_path):
    inp = write_dwi(tmp_path / "dwi.nii.gz")
    out = tmp_path / "o.nii"
    out.write_bytes(b"old")
    assert cli("denoise", inp, out) == 2
    assert cli("denoise", inp, out, "--force") == 0
    assert out.read_bytes() != b"old"


def test_log_level_and_log_file(tmp_path, capsys):
    inp = write_dwi(tmp_path / "dwi.nii.gz")
    out, log = tmp_path / "o.nii", tmp_path / "run.log"
    assert cli("denoise", inp, out, "--log_level", "info", "--log_file", log) == 0
    assert log.exists()
    logging.getLogger("p2s_dask").info("after the run")  # the handler is gone
    assert "after the run" not in log.read_text()


@pytest.mark.parametrize("spec,expect", [
    ("shell", [0, 0, 0] + [1] * 9 + [2] * 8),
    ("batch:4", [0, 0, 0] + [1] * 4 + [2] * 4 + [3] * 4 + [4] * 5),
])
def test_groups_spec_equals_the_api_with_labels(tmp_path, spec, expect):
    inp = write_dwi(tmp_path / "dwi.nii.gz")
    out = tmp_path / "o.nii"
    assert cli("denoise", inp, out, "--groups", spec, "--out-dtype", "float64") == 0
    img = nib.load(str(inp))
    api = patch2self(img.get_fdata(), BVALS, groups=np.array(expect), out_dtype=np.float64)
    np.testing.assert_allclose(np.asanyarray(nib.load(str(out)).dataobj), api,
                               rtol=0, atol=1e-9 * np.abs(api).max())
    labels = tmp_path / "labels.txt"
    labels.write_text(" ".join(map(str, expect)))
    out2 = tmp_path / "o2.nii"
    assert cli("denoise", inp, out2, "--groups", labels, "--out-dtype", "float64") == 0
    assert out2.read_bytes() == out.read_bytes()


def test_bad_groups_spec_is_one_line(tmp_path, capsys):
    inp = write_dwi(tmp_path / "dwi.nii.gz")
    assert cli("denoise", inp, tmp_path / "o.nii", "--groups", "batch:1") == 2
    assert cli("denoise", inp, tmp_path / "o.nii", "--groups", "nonsense") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("--groups" in e for e in err)


def test_every_option_has_a_flag_or_is_api_only():
    for f in option_fields():
        assert f.metadata["flag"] or f.name in ("progress", "gram", "sources"), f.name
