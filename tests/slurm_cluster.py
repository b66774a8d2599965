"""A real one-node Slurm cluster for the tests, kept entirely under one folder.

It installs nothing (``.ci/run`` installs ``slurm-wlm munge`` with apt).  It starts
``munged``, ``slurmctld`` and ``slurmd`` with their config, state, spool, logs, pid
files, munge key and socket under ``ROOT`` on non-default ports (so it clashes with
nothing on the machine), and stops exactly the processes it started: the PIDs read
from its own pid files, each checked against ``/proc/PID/comm`` before it is signalled.

As a script (for demos, e.g. the ``emloop run … --backend slurm`` must-show)::

    python tests/slurm_cluster.py start /tmp/myslurm     # prints: export SLURM_CONF=/tmp/myslurm/slurm.conf
    python tests/slurm_cluster.py stop  /tmp/myslurm

From Python / pytest::

    cluster = SlurmCluster(tmp_dir); cluster.start(); cluster.env  # {"SLURM_CONF": ...}
    cluster.stop()
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scancel", "sinfo", "scontrol", "sacct")


def missing_reason() -> str | None:
    """Why a real Slurm cannot be started here, or None when it can."""
    for exe in ("munged", "mungekey", "slurmctld", "slurmd") + CLIENTS:
        if shutil.which(exe, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None:
            return f"{exe} is not installed (apt-get install -y slurm-wlm munge)"
    if os.geteuid() != 0:
        return "slurmd must run as root to start job steps; these tests need root"
    return None


def _which(exe: str) -> str:
    path = shutil.which(exe, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if path is None:
        raise RuntimeError(f"{exe} is not installed")
    return path


def _mem_total_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 4096


class SlurmCluster:
    """One-node Slurm (node ``localhost``, partition ``debug``) under ``root``.

    ``cpus`` is the CPU count the node claims (``config_overrides`` lets it claim
    more than the machine has, so several small MPI jobs can run at once).
    """

    def __init__(self, root: str | os.PathLike, *, ctld_port: int = 16817, slurmd_port: int = 16818,
                 cpus: int = 8, cluster_name: str = "emlooptest"):
        self.root = Path(root).resolve()
        self.ctld_port = ctld_port
        self.slurmd_port = slurmd_port
        self.cpus = cpus
        self.cluster_name = cluster_name
        self.conf = self.root / "slurm.conf"
        self.munge_dir = self.root / "munge"
        self.socket = self.munge_dir / "munge.socket.2"

    # -- paths ---------------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        """Environment variables every Slurm client command needs."""
        return {"SLURM_CONF": str(self.conf)}

    def _pidfile(self, daemon: str) -> Path:
        return (self.munge_dir / "munged.pid") if daemon == "munged" else (self.root / "run" / f"{daemon}.pid")

    def _client_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.env)
        return env

    # -- start -----------------------------------------------------------------
    def write_config(self) -> None:
        for sub in ("munge", "state", "spool", "run", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.munge_dir.chmod(0o755)
        r = self.root
        self.conf.write_text("\n".join([
            f"ClusterName={self.cluster_name}",
            "SlurmctldHost=localhost",
            f"SlurmctldPort={self.ctld_port}",
            f"SlurmdPort={self.slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.socket}",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool",
            f"SlurmctldPidFile={r}/run/slurmctld.pid",
            f"SlurmdPidFile={r}/run/slurmd.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdLogFile={r}/log/slurmd.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "MpiDefault=pmi2",
            "ReturnToService=2",
            "MailProg=/bin/true",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={r}/log/jobcomp.txt",
            "MinJobAge=300",
            "KillWait=2",
            "SlurmdParameters=config_overrides",
            f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={self.cpus} "
            f"RealMemory={max(_mem_total_mb() - 1024, 512)} State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))

    def start(self, timeout_s: float = 30.0) -> "SlurmCluster":
        reason = missing_reason()
        if reason:
            raise RuntimeError(reason)
        self.write_config()
        key = self.munge_dir / "munge.key"
        if not key.exists():
            subprocess.run([_which("mungekey"), "--create", f"--keyfile={key}"], check=True,
                           capture_output=True)
            key.chmod(0o400)
        subprocess.run([_which("munged"), "--force", f"--key-file={key}", f"--socket={self.socket}",
                        f"--pid-file={self._pidfile('munged')}", f"--log-file={self.munge_dir / 'munged.log'}",
                        f"--seed-file={self.munge_dir / 'munged.seed'}"], check=True, capture_output=True)
        self._wait_pidfile("munged", timeout_s)
        env = self._client_env()
        subprocess.run([_which("slurmctld"), "-c", "-f", str(self.conf)], check=True, env=env,
                       capture_output=True)
        self._wait_pidfile("slurmctld", timeout_s)
        subprocess.run([_which("slurmd"), "-f", str(self.conf), "-N", "localhost"], check=True, env=env,
                       capture_output=True)
        self._wait_pidfile("slurmd", timeout_s)
        deadline = time.monotonic() + timeout_s
        state = ""
        while time.monotonic() < deadline:
            res = subprocess.run(["sinfo", "-h", "-n", "localhost", "-o", "%T"], env=env,
                                 capture_output=True, text=True)
            state = res.stdout.strip()
            if state == "idle":
                return self
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"slurm node did not become idle within {timeout_s} s (state {state!r}); "
                           f"see {self.root / 'log'}")

    def _wait_pidfile(self, daemon: str, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            pid = self._pid(daemon)
            if pid is not None:
                return pid
            time.sleep(0.1)
        raise RuntimeError(f"{daemon} did not start (no live pid in {self._pidfile(daemon)}); "
                           f"see {self.root / 'log'}")

    def _pid(self, daemon: str) -> int | None:
        """The PID in our own pid file if that process is alive and is ``daemon``."""
        try:
            pid = int(self._pidfile(daemon).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            return None
        # Debian installs slurmctld-wlm / slurmd-wlm; the kernel comm is the short name
        return pid if comm.startswith(daemon) else None

    def pids(self) -> dict[str, int]:
        """PIDs of the daemons of this cluster that are alive now."""
        return {d: p for d in DAEMONS if (p := self._pid(d)) is not None}

    # -- stop ------------------------------------------------------------------
    def stop(self, timeout_s: float = 20.0) -> None:
        """Cancel this cluster's jobs, then SIGTERM exactly the daemons it started."""
        if self._pid("slurmctld") is not None:
            env = self._client_env()
            subprocess.run(["scancel", "--full", "-u", "root"] if os.geteuid() == 0 else
                           ["scancel", "--full", "--me"], env=env, capture_output=True, timeout=30)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                res = subprocess.run(["squeue", "-h", "-t", "PD,R,CG,S", "-o", "%i"], env=env,
                                     capture_output=True, text=True, timeout=30)
                if res.returncode != 0 or not res.stdout.strip():
                    break
                time.sleep(0.3)
        for daemon in ("slurmd", "slurmctld", "munged"):
            pid = self._pid(daemon)
            if pid is None:
                continue
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and self._alive(pid, daemon):
                time.sleep(0.1)
            if self._alive(pid, daemon):
                os.kill(pid, signal.SIGKILL)

    @staticmethod
    def _alive(pid: int, daemon: str) -> bool:
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        state = stat.rsplit(")", 1)[-1].split()[0]
        return comm.startswith(daemon) and state != "Z"


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] not in ("start", "stop", "status"):
        print("usage: python tests/slurm_cluster.py start|stop|status ROOT", file=sys.stderr)
        return 2
    cluster = SlurmCluster(argv[2])
    if argv[1] == "start":
        cluster.start()
        print(f"export SLURM_CONF={cluster.conf}")
    elif argv[1] == "stop":
        cluster.stop()
    else:
        print(cluster.pids())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
