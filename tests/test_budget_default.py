"""The default budget comes from the machine: half of what the process may
use, the smaller of the RAM and a container's (cgroup) limit."""

import psutil

from p2s_dask.config import budget
from p2s_dask.fronts.cli import main

from test_faults import write_dwi


def test_a_cgroup_limit_gives_its_half(tmp_path, monkeypatch):
    limit = tmp_path / "memory.max"
    limit.write_text(f"{8 << 30}\n")
    monkeypatch.setattr(budget, "CGROUP_LIMIT_FILES", (str(limit),))
    assert budget.auto_memory_limit() == 4 << 30
    assert budget.parse_memory_limit("auto") == 4 << 30
    assert budget.parse_memory_limit(None) == 4 << 30
    # a limit above the RAM does not count; "max" (cgroup v2) and v1's huge
    # number mean no limit
    ram = psutil.virtual_memory().total
    for text in (str(2 * ram), "max", str((1 << 63) - 4096)):
        limit.write_text(text + "\n")
        assert budget.auto_memory_limit() == int(0.5 * ram), text
    # no cgroup file at all
    monkeypatch.setattr(budget, "CGROUP_LIMIT_FILES", (str(tmp_path / "none"),))
    assert budget.auto_memory_limit() == int(0.5 * ram)


def test_the_run_uses_it_and_help_says_the_rule(tmp_path, monkeypatch, capsys):
    limit = tmp_path / "memory.max"
    limit.write_text(f"{6 << 30}\n")
    monkeypatch.setattr(budget, "CGROUP_LIMIT_FILES", (str(limit),))
    write_dwi(tmp_path / "dwi.nii.gz", shape=(8, 7, 6))
    assert main(["denoise", str(tmp_path / "dwi.nii.gz"), str(tmp_path / "o.nii.gz"),
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "1 worker(s) x" in out and "3.00 GiB each" in out, out
    # the user's value still rules
    assert main(["denoise", str(tmp_path / "dwi.nii.gz"), str(tmp_path / "o.nii.gz"),
                 "--dry-run", "--memory-limit", "1GiB"]) == 0
    assert "1.00 GiB each" in capsys.readouterr().out
    try:
        main(["denoise", "--help"])
    except SystemExit:
        pass
    text = " ".join(capsys.readouterr().out.split())
    assert "default: auto, 50% of the memory this process may use" in text
