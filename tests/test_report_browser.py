"""The QC report in a real browser: Debian's chromium, headless, driven by
Playwright (its own browser downloads are never used).

The page is opened from its file with the network cut off: it must show
without a console error, decode every image, hold every section, and show
flagged the one volume of a phantom whose slice was dropped, and only it.
"""

import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from p2s_dask.fronts.cli import main

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SECTIONS = ("qc-summary", "qc-mosaics", "qc-noise", "qc-residuals", "qc-histogram", "qc-run")


def _browser_or_skip():
    """Playwright and chromium, or a skip (a failure on CI, which installs both)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if sync_playwright is None or not shutil.which(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail("CI installs chromium and playwright (.ci/run): both must be there")
        pytest.skip("needs playwright and Debian's chromium (apt-get install chromium)")
    return sync_playwright


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    sync_playwright = _browser_or_skip()
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("profile")), executable_path=CHROMIUM,
            headless=True, args=ARGS)
        yield context
        context.close()


def inspect(context, page_file):
    """Open ``page_file``; return what the page shows and what went wrong."""
    page = context.new_page()
    errors, requests = [], []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))

    def offline(route):
        if route.request.url.startswith(("file:", "data:")):
            route.continue_()
        else:  # the page must need nothing from a network
            requests.append(route.request.url)
            route.abort()
    page.route("**/*", offline)
    page.goto(Path(page_file).resolve().as_uri())
    page.wait_for_load_state("load")
    shown = page.evaluate("""() => ({
        images: Array.from(document.images).map(i => [i.complete, i.naturalWidth,
                                                        i.src.slice(0, 22)]),
        sections: Array.from(document.querySelectorAll('section')).map(s => s.className),
        flagged: Array.from(document.querySelectorAll('li.flagged-volume'))
                      .map(li => Number(li.dataset.volume)),
        noFlags: document.querySelectorAll('.no-flags').length,
    })""")
    page.close()
    return shown, errors, requests


def _phantom_with_a_dropped_slice(folder):
    from p2s_dask.testing.phantom import make_phantom
    ph = make_phantom(shape=(32, 32, 16), nvols=30, nb0=3, shells=(1000.0,), snr=20.0, seed=0)
    volume = int(np.flatnonzero(ph["bvals"] > 50)[7])
    dwi = ph["dwi"].copy()
    dwi[:, :, 8, volume] = 0
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(dwi, ph["affine"]), str(folder / "dwi.nii.gz"))
    np.savetxt(folder / "dwi.bval", ph["bvals"][None], fmt="%g")
    np.savetxt(folder / "dwi.bvec", ph["bvecs"].T, fmt="%.6f")
    return folder / "dwi.nii.gz", volume


def test_the_report_shows_the_dropped_slice_flagged(browser, tmp_path):
    inp, volume = _phantom_with_a_dropped_slice(tmp_path / "in")
    report = tmp_path / "report.html"
    assert main(["denoise", str(inp), str(tmp_path / "o.nii.gz"), "--report", str(report),
                 "--quiet"]) == 0
    shown, errors, requests = inspect(browser, report)
    assert not errors and not requests
    assert len(shown["images"]) == 4
    assert all(done and width > 0 and src.startswith("data:image/png")
               for done, width, src in shown["images"])
    assert set(SECTIONS) <= set(shown["sections"])
    assert shown["flagged"] == [volume] and shown["noFlags"] == 0


def test_a_subject_page_of_a_bids_dataset(browser, tmp_path):
    """Two runs of one subject, one page; its figures inlined from the
    files beside each run's section, which are there too."""
    from test_faults import write_dwi
    root = tmp_path / "bids"
    for ses in ("a", "b"):
        folder = root / "sub-01" / f"ses-{ses}" / "dwi"
        folder.mkdir(parents=True)
        write_dwi(folder / f"sub-01_ses-{ses}_dwi.nii.gz", seed=ord(ses))
    (root / "dataset_description.json").write_text(json.dumps({"Name": "t",
                                                               "BIDSVersion": "1.9.0"}))
    out = tmp_path / "deriv"
    assert main(["bids", str(root), str(out), "participant", "--quiet"]) == 0
    shown, errors, requests = inspect(browser, out / "sub-01.html")
    assert not errors and not requests
    assert len(shown["images"]) == 8 and all(w > 0 for _, w, _ in shown["images"])
    assert shown["sections"].count("qc-run-report") == 2
    assert len(list((out / "sub-01" / "figures").glob("*.png"))) == 8
