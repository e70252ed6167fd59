"""Run ``p2s-dask`` under an audit hook; used by tests/test_audit.py.

Usage: python -B audit_run.py EVENTS_FILE ARGV...

Every path the process opens for writing, renames, replaces, removes or
makes is written to EVENTS_FILE as one JSON line as it happens (through a
descriptor opened before the hook, so a killed run leaves what it did), and
so is every manifest the run hands to the checker (``check_layout``), which
every front calls before it writes. Python's audit hooks cannot be removed,
hence a process of its own.
"""

import json
import os
import sys

EVENTS = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_busy = False


def _emit(record):
    os.write(EVENTS, (json.dumps(record) + "\n").encode())


def _writes(mode, flags) -> bool:
    if isinstance(mode, str):
        return any(c in mode for c in "wax+")
    return isinstance(flags, int) and bool(flags & _WRITE_FLAGS)


def _path(value, dir_fd=None):
    """The absolute path of ``value``; relative to ``dir_fd`` when one is
    given (shutil.rmtree removes entries by name inside an open folder)."""
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    if not isinstance(value, (str, os.PathLike)):
        return None  # a descriptor
    value = os.fspath(value)
    if isinstance(dir_fd, int) and not os.path.isabs(value):
        value = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), value)
    return os.path.abspath(value)


def hook(event, args):
    global _busy
    if _busy:
        return
    _busy = True
    try:
        paths = []
        if event == "open" and _writes(args[1], args[2] if len(args) > 2 else None):
            paths = [(args[0], None)]
        elif event in ("os.rename", "os.replace"):
            paths = [(args[0], args[2]), (args[1], args[3])]
        elif event in ("os.link", "os.symlink"):
            paths = [(args[1], None)]
        elif event in ("os.remove", "os.rmdir"):
            paths = [(args[0], args[1])]
        elif event == "os.mkdir":
            paths = [(args[0], args[2])]
        elif event in ("shutil.rmtree", "os.truncate"):
            paths = [(args[0], None)]
        for p, dir_fd in paths:
            real = _path(p, dir_fd)
            if real is not None:
                _emit({"event": event, "path": real})
    finally:
        _busy = False


def main():
    from p2s_dask.fronts import cli
    from p2s_dask.planning import checker

    original = checker.check_layout

    def recording(manifest):
        _emit({"manifest": manifest.as_dict()})
        return original(manifest)

    checker.check_layout = recording
    sys.addaudithook(hook)
    return cli.main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
