"""launch.runner (the per-job wrapper) and the PBS status parser, without a scheduler."""
import json
import subprocess
import sys
from pathlib import Path

from launch.backends import pbs_records

REPO = Path(__file__).resolve().parents[1]


def _runner(tmp_path, *args, program):
    st, out, err = tmp_path / "s.json", tmp_path / "o.txt", tmp_path / "e.txt"
    res = subprocess.run([sys.executable, "-m", "launch.runner", "--status", str(st), "--stdout", str(out),
                          "--stderr", str(err), *args, "--", *program], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    return res, json.loads(st.read_text()) if st.exists() else None, out, err


def test_runner_records_exit_code_and_output(tmp_path):
    res, st, out, err = _runner(tmp_path, program=[sys.executable, "-c",
                                                   "import sys; print('hello'); print('oops', file=sys.stderr); "
                                                   "sys.exit(3)"])
    assert res.returncode == 3
    assert st["state"] == "exited" and st["exit_code"] == 3 and st["timed_out"] is False
    assert st["started_at"] <= st["ended_at"]
    assert out.read_text() == "hello\n" and err.read_text() == "oops\n"


def test_runner_walltime_terminates_and_flags_timeout(tmp_path):
    res, st, out, err = _runner(tmp_path, "--walltime-s", "1", program=["sleep", "30"])
    assert res.returncode == 128 + 15 and st["timed_out"] is True and st["signal"] == 15
    assert "walltime of 1 s exceeded" in err.read_text()


def test_runner_program_not_found(tmp_path):
    res, st, out, err = _runner(tmp_path, program=["/nonexistent/mpiexec", "-n", "2"])
    assert res.returncode == 127 and st["exit_code"] == 127
    assert "cannot start /nonexistent/mpiexec" in err.read_text()


def test_runner_needs_a_program(tmp_path):
    res, st, _, _ = _runner(tmp_path, program=[])
    assert res.returncode == 2 and st is None


def test_pbs_status_records():
    report = {"Jobs": {
        "101.pbs01": {"job_state": "Q"},
        "102.pbs01": {"job_state": "R"},
        "103.pbs01": {"job_state": "F", "Exit_status": 0},
        "104.pbs01": {"job_state": "F", "Exit_status": 3},
        "105.pbs01": {"job_state": "F", "Exit_status": -29, "comment": "job killed: walltime 40 exceeded limit 30"},
        "106.pbs01": {"job_state": "F", "Exit_status": 271},
        "107.pbs01": {"job_state": "F", "comment": "Job deleted before it ran"},
    }}
    recs = pbs_records(json.dumps(report))
    got = {k: recs[k].state for k in report["Jobs"]}
    assert got == {"101.pbs01": "queued", "102.pbs01": "running", "103.pbs01": "completed",
                   "104.pbs01": "failed", "105.pbs01": "timed_out", "106.pbs01": "cancelled",
                   "107.pbs01": "cancelled"}
    assert recs["104"].exit_code == 3 and recs["105.pbs01"].message.startswith("job killed")
