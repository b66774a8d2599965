"""The wrapper every dispatched job runs: ``python -m launch.runner [options] -- PROGRAM ARGS...``.

psij's launcher starts this module on the job's first node (inside the Slurm or PBS
allocation, or as a local process).  It runs ``PROGRAM ARGS...`` (the MPI starter,
e.g. ``mpiexec -n 4 python -m pipeline_core.stages.montage --project P --run R``)
*without a shell*, writes the program's stdout/stderr to the job's log files, and
records the job's life in a small JSON status file that the submitting side reads
(it is on the shared project file system)::

    {"state": "running", "pid": 1234, "host": "nid0042", "started_at": 1764180000.1}
    {"state": "exited",  ..., "ended_at": ..., "exit_code": 3, "signal": null, "timed_out": false}

This gives every backend the same exit code and timing record, including local jobs
whose submitting process has gone away (psij can attach to a local PID but cannot
learn its exit status).

Signals: SIGTERM/SIGINT/SIGHUP are forwarded to the program's process group and the
end is still recorded.  ``--walltime-s`` (local backend; batch schedulers enforce
their own limit) terminates the program when its time is up and records
``timed_out: true``.  The exit status is the program's (128+N when killed by
signal N).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

GRACE_S = 5.0


def write_status(path: Path, data: dict) -> None:
    """Atomically replace ``path`` with ``data`` as JSON (write to a temp file, then rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.runner",
                                 description="run one emloop job program and record its exit status")
    ap.add_argument("--status", required=True, type=Path, help="JSON status file to write")
    ap.add_argument("--stdout", required=True, type=Path, help="file for the program's stdout (appended)")
    ap.add_argument("--stderr", required=True, type=Path, help="file for the program's stderr (appended)")
    ap.add_argument("--walltime-s", type=float, default=None,
                    help="terminate the program after this many seconds (local backend)")
    ap.add_argument("--detach", action="store_true",
                    help="start a new session so the job outlives the terminal that submitted it")
    ap.add_argument("program", nargs=argparse.REMAINDER, help="-- PROGRAM ARGS...")
    args = ap.parse_args(argv)
    program = args.program[1:] if args.program[:1] == ["--"] else args.program
    if not program:
        ap.error("no program given after --")
    if args.detach:
        try:
            os.setsid()
        except OSError:
            pass  # already a session leader

    record = {"state": "running", "pid": os.getpid(), "host": socket.gethostname(), "started_at": time.time(),
              "program": program[0]}
    write_status(args.status, record)

    received: list[int] = []
    with open(args.stdout, "ab") as out, open(args.stderr, "ab") as err:
        try:
            proc = subprocess.Popen(program, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        except OSError as e:
            err.write(f"launch.runner: cannot start {program[0]}: {e}\n".encode())
            record.update(state="exited", ended_at=time.time(), exit_code=127, signal=None, timed_out=False)
            write_status(args.status, record)
            return 127

        def forward(signum, _frame):
            received.append(signum)
            _signal_group(proc, signal.SIGTERM)

        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(s, forward)

        timed_out = False
        deadline = None if args.walltime_s is None else time.monotonic() + args.walltime_s
        rc = None
        while rc is None:
            timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            try:
                rc = proc.wait(timeout=timeout if timeout is None else min(timeout, 1.0))
            except subprocess.TimeoutExpired:
                if deadline is not None and time.monotonic() >= deadline and not timed_out:
                    timed_out = True
                    err.write(f"launch.runner: walltime of {args.walltime_s:g} s exceeded; "
                              f"terminating the job\n".encode())
                    err.flush()
                    _signal_group(proc, signal.SIGTERM)
                    deadline = time.monotonic() + GRACE_S  # then SIGKILL
                elif timed_out and time.monotonic() >= deadline:
                    _signal_group(proc, signal.SIGKILL)
                    deadline = None
        # make sure nothing of the program's process group outlives the job
        _signal_group(proc, signal.SIGKILL)
    sig = -rc if rc < 0 else None
    exit_code = 128 + sig if sig is not None else rc
    record.update(state="exited", ended_at=time.time(), exit_code=exit_code, signal=sig, timed_out=timed_out,
                  received_signal=received[0] if received else None)
    write_status(args.status, record)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
