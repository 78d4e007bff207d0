"""Run a Python command and report its own peak RSS, for the benchmarks that measure memory.

``ru_maxrss`` from ``wait4`` is not the command's own peak: Linux carries the parent's high-water
mark over ``fork`` and ``exec`` into the child's, so a benchmark that held gigabytes before starting a
step would see them in every step. This wrapper runs the command in a fresh interpreter and, at its
exit, reads ``VmHWM`` (the peak resident set of the process's own address space since ``exec``)
from ``/proc/self/status``.

    python benchmarks/peak_rss.py OUT.json -- -m langneurons identify lape ...
    python benchmarks/peak_rss.py OUT.json -- -c "code" ARG ...

From Python: ``run(args, log=None, env=None, cwd=None) -> {"seconds", "peak_rss_bytes", "rc"}``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time


def run(args: list[str], log=None, env=None, cwd=None) -> dict:
    """Run ``python ARGS`` (``-m MODULE ...``, ``-c CODE ...`` or ``SCRIPT ...``) with its output in
    ``log`` (or captured); returns wall seconds, its own peak RSS in bytes and the exit status."""
    fd, out = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    t0 = time.perf_counter()
    try:
        if log is not None:
            with open(log, "w") as fh:
                p = subprocess.run([sys.executable, os.path.abspath(__file__), out, "--", *args],
                                   stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=cwd)
            text = ""
        else:
            p = subprocess.run([sys.executable, os.path.abspath(__file__), out, "--", *args],
                               capture_output=True, text=True, env=env, cwd=cwd)
            text = (p.stderr or p.stdout or "").strip()
        seconds = time.perf_counter() - t0
        try:
            with open(out) as f:
                peak = json.load(f)["peak_rss_bytes"]
        except (OSError, ValueError, KeyError):
            peak = float("nan")   # killed before it could report
    finally:
        os.unlink(out)
    res = {"seconds": seconds, "peak_rss_bytes": peak, "rc": p.returncode}
    if p.returncode and text:
        res["error"] = text.splitlines()[-1]
    return res


def _vm_hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return -1


def _child(out: str, args: list[str]) -> None:
    import atexit
    import runpy

    atexit.register(lambda: open(out, "w").write(json.dumps({"peak_rss_bytes": _vm_hwm()})))
    if args[0] == "-m":
        sys.argv = [args[1], *args[2:]]
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    elif args[0] == "-c":
        sys.argv = ["-c", *args[2:]]
        exec(compile(args[1], "<string>", "exec"), {"__name__": "__main__"})
    else:
        sys.argv = list(args)
        runpy.run_path(args[0], run_name="__main__")


if __name__ == "__main__":
    if len(sys.argv) < 4 or sys.argv[2] != "--":
        raise SystemExit("usage: python benchmarks/peak_rss.py OUT.json -- (-m MODULE | -c CODE | SCRIPT) [ARGS...]")
    _child(sys.argv[1], sys.argv[3:])
