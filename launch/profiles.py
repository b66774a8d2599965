"""Backend profiles: where and how a stage's MPI job runs.

A profile names a psij backend (``local``, ``slurm``, ``pbs``) and the site details a
job needs there: queue/partition, account, ranks per node, default walltime, the
environment setup lines a job script runs before starting (module loads, venv
activation), extra environment variables, extra scheduler attributes, and how MPI is
started (``mpiexec`` or ``srun``).

Profiles live in ``PROJECT/profiles.yaml``::

    profiles:
      slurm:
        backend: slurm
        partition: debug
        walltime: "00:30:00"
      polaris:
        backend: pbs
        queue: debug
        account: MyAllocation
        ranks_per_node: 4
        exclusive: true
        attributes: {l: "filesystems=home:eagle"}
        setup: ["module use /soft/modulefiles", "module load conda", "source /home/me/emloop/.venv/bin/activate"]
        mpiexec: mpiexec
        ppn_flag: --ppn
        mpiexec_args: [--cpu-bind, depth, --depth, "16"]
        python: python

``local`` is always available (built in); ``slurm`` and ``polaris`` above are the
built-in examples, and the project file may override any of them or add more.

Trust: ``profiles.yaml`` is site configuration written by the operator; its ``setup``
lines are shell by nature and are written verbatim into the job's pre-launch script.
Every other value (queue, account, attributes, environment, paths) is validated
against a strict character set and is only ever passed to psij as data, which quotes
it.  Nothing typed in the dashboard or on the command line is ever a shell line.
"""
from __future__ import annotations

import dataclasses
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline_core.errors import EmloopError, InputError

PROFILES_FILE = "profiles.yaml"
BACKENDS = ("local", "slurm", "pbs")
LAUNCHERS = ("mpiexec", "srun")

# names: a queue, a partition, an account, a profile
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@+-]{0,127}$")
# scheduler attribute keys (e.g. "constraint", "qos", "l") and environment variable names
ATTR_KEY_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
# values: no whitespace, quotes, $, `, ;, &, |, <, >, (, ), \, !, *, ?, [, ], {, }, ~, #, newline
VALUE_RE = re.compile(r"^[A-Za-z0-9_.,:=@%+/-]{1,512}$")
# executables and flags of the MPI starter
PATHLIKE_RE = re.compile(r"^[A-Za-z0-9_.,:=@%+/-]{1,1024}$")
# walltime: MM | H:MM | H:MM:SS | D-H | D-H:MM | D-H:MM:SS
WALLTIME_RE = re.compile(r"^(?:(?P<d>\d{1,3})-(?P<dh>\d{1,2})(?::(?P<dm>\d{1,2})(?::(?P<ds>\d{1,2}))?)?"
                         r"|(?P<h>\d{1,4}):(?P<m>\d{1,2})(?::(?P<s>\d{1,2}))?"
                         r"|(?P<mm>\d{1,6}))$")

_KNOWN_KEYS = {"backend", "description", "queue", "partition", "account", "ranks", "ranks_per_node", "nodes",
               "walltime", "exclusive", "setup", "env", "attributes", "launcher", "mpiexec", "mpiexec_args",
               "ppn_flag", "python", "poll_interval"}


def check_name(value: Any, what: str) -> str:
    """A queue/partition/account/profile name: letters, digits, ``_.@+-``; else a one-line error."""
    s = value if isinstance(value, str) else str(value)
    if not NAME_RE.match(s):
        raise InputError(f"{what} {s!r} is not allowed: use letters, digits and _ . @ + - only "
                         f"(no spaces, quotes or shell characters)")
    return s


def check_value(value: Any, what: str) -> str:
    """A scheduler attribute / environment value with no shell metacharacters."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise InputError(f"{what} must be a plain string or number, got {type(value).__name__}")
    s = str(value)
    if not VALUE_RE.match(s):
        raise InputError(f"{what} {s!r} is not allowed: use letters, digits and _ . , : = @ % + / - only "
                         f"(no spaces, quotes or shell characters)")
    return s


def check_positive_int(value: Any, what: str) -> int:
    """An integer ≥ 1 (bools and non-integral numbers refused)."""
    if isinstance(value, bool):
        raise InputError(f"{what} must be a whole number ≥ 1, got {value!r}")
    if isinstance(value, str):
        if not re.fullmatch(r"\s*\d+\s*", value):
            raise InputError(f"{what} must be a whole number ≥ 1, got {value!r}")
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or value < 1:
        raise InputError(f"{what} must be a whole number ≥ 1, got {value!r}")
    return value


def parse_walltime(value: Any, what: str = "--walltime") -> int:
    """Walltime → seconds.

    Accepts minutes as an int or ``"MM"``, ``"H:MM"``, ``"H:MM:SS"``, ``"D-H"``,
    ``"D-H:MM"``, ``"D-H:MM:SS"`` (Slurm/PBS forms); minutes and seconds fields must be
    < 60; the total must be > 0.
    """
    if isinstance(value, bool):
        raise InputError(f"{what} {value!r} is malformed: use minutes or H:MM:SS")
    if isinstance(value, int):
        if value < 1:
            raise InputError(f"{what} must be at least 1 minute, got {value}")
        return value * 60
    s = str(value).strip()
    m = WALLTIME_RE.match(s)
    if m is None:
        raise InputError(f"{what} {str(value)!r} is malformed: use minutes, H:MM, H:MM:SS or D-H:MM:SS")
    g = {k: int(v) if v is not None else 0 for k, v in m.groupdict().items()}
    if m.group("mm") is not None:
        secs = g["mm"] * 60
    elif m.group("h") is not None:
        if g["m"] >= 60 or g["s"] >= 60:
            raise InputError(f"{what} {s!r} is malformed: minutes and seconds must be below 60")
        secs = g["h"] * 3600 + g["m"] * 60 + g["s"]
    else:
        if g["dh"] >= 24 or g["dm"] >= 60 or g["ds"] >= 60:
            raise InputError(f"{what} {s!r} is malformed: hours < 24, minutes and seconds < 60")
        secs = g["d"] * 86400 + g["dh"] * 3600 + g["dm"] * 60 + g["ds"]
    if secs <= 0:
        raise InputError(f"{what} {s!r} must be longer than zero")
    return secs


def format_walltime(seconds: int) -> str:
    """Seconds → ``H:MM:SS``."""
    h, rem = divmod(int(seconds), 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


def venv_python() -> str:
    """The Python of this installation (compute nodes share the file system by default)."""
    return sys.executable


def venv_mpiexec() -> str:
    """The MPI starter next to this Python (the pip MPICH wheel's ``mpiexec``), or ``mpiexec``."""
    p = Path(sys.executable).parent / "mpiexec"
    return str(p) if p.exists() else "mpiexec"


@dataclass(frozen=True)
class Profile:
    """One backend profile (see the module docstring for the YAML form)."""

    name: str
    backend: str = "local"
    description: str = ""
    queue: str | None = None          # Slurm partition / PBS queue
    account: str | None = None        # Slurm account / PBS project (-A)
    ranks: int | None = None          # default rank count
    ranks_per_node: int | None = None
    nodes: int | None = None
    walltime: str | None = None       # default walltime (see parse_walltime)
    exclusive: bool = False           # whole nodes (PBS place=scatter:exclhost, Slurm --exclusive)
    setup: tuple[str, ...] = ()       # shell lines sourced before the launch (trusted site config)
    env: tuple[tuple[str, str], ...] = ()
    attributes: tuple[tuple[str, str], ...] = ()  # extra scheduler directives: key → value
    launcher: str = "mpiexec"         # how MPI starts: mpiexec (any backend) or srun (slurm)
    mpiexec: str | None = None        # MPI starter executable [default: the venv's mpiexec]
    mpiexec_args: tuple[str, ...] = ()
    ppn_flag: str | None = None       # e.g. "--ppn" (Cray PALS on Polaris/Aurora)
    python: str | None = None         # Python on the compute side [default: this Python]
    poll_interval: float = 5.0        # seconds between scheduler polls while waiting
    source: str = "built-in"          # where the profile came from

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["env"] = dict(self.env)
        d["attributes"] = dict(self.attributes)
        d["setup"] = list(self.setup)
        d["mpiexec_args"] = list(self.mpiexec_args)
        return d

    @property
    def python_exe(self) -> str:
        return self.python or venv_python()

    @property
    def mpiexec_exe(self) -> str:
        return self.mpiexec or venv_mpiexec()


BUILTIN: dict[str, dict[str, Any]] = {
    "local": {
        "backend": "local",
        "description": "this machine: the venv's mpiexec, no scheduler",
        "poll_interval": 0.5,
    },
    "slurm": {
        "backend": "slurm",
        "description": "Slurm example: default partition, the venv's mpiexec inside the allocation",
        "walltime": "01:00:00",
        "poll_interval": 2.0,
    },
    "polaris": {
        "backend": "pbs",
        "description": "PBS Pro example for ALCF Polaris-like sites (4 ranks per node, Cray mpiexec)",
        "queue": "debug",
        "account": "MyAllocation",
        "ranks_per_node": 4,
        "walltime": "00:30:00",
        "exclusive": True,
        "attributes": {"l": "filesystems=home:eagle"},
        "setup": ["module use /soft/modulefiles", "module load conda"],
        "mpiexec": "mpiexec",
        "ppn_flag": "--ppn",
        "mpiexec_args": ["--cpu-bind", "depth", "--depth", "16"],
        "python": "python",
        "poll_interval": 30.0,
    },
}


def make_profile(name: str, raw: dict[str, Any], source: str = "built-in") -> Profile:
    """Validate one profile mapping; every problem is a one-line error naming the key."""
    where = f"{source}: profile {name!r}"
    check_name(name, f"{source}: profile name")
    if not isinstance(raw, dict):
        raise InputError(f"{where} must be a mapping of settings")
    unknown = sorted(set(raw) - _KNOWN_KEYS)
    if unknown:
        raise InputError(f"{where}: unknown setting {unknown[0]!r} (known: {', '.join(sorted(_KNOWN_KEYS))})")
    backend = raw.get("backend", "local")
    if backend not in BACKENDS:
        raise InputError(f"{where}: backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    kw: dict[str, Any] = {"name": name, "backend": backend, "source": source}
    kw["description"] = " ".join(str(raw.get("description", "")).split())
    queue = raw.get("queue", raw.get("partition"))
    if "queue" in raw and "partition" in raw:
        raise InputError(f"{where}: give queue or partition, not both")
    if queue is not None:
        kw["queue"] = check_name(queue, f"{where}: queue")
    if raw.get("account") is not None:
        kw["account"] = check_name(raw["account"], f"{where}: account")
    for k in ("ranks", "ranks_per_node", "nodes"):
        if raw.get(k) is not None:
            kw[k] = check_positive_int(raw[k], f"{where}: {k}")
    if raw.get("walltime") is not None:
        parse_walltime(raw["walltime"], f"{where}: walltime")
        kw["walltime"] = str(raw["walltime"])
    if "exclusive" in raw:
        if not isinstance(raw["exclusive"], bool):
            raise InputError(f"{where}: exclusive must be true or false")
        kw["exclusive"] = raw["exclusive"]
    setup = raw.get("setup", [])
    if isinstance(setup, str):
        setup = [setup]
    if not isinstance(setup, list):
        raise InputError(f"{where}: setup must be a list of shell lines")
    lines = []
    for i, line in enumerate(setup):
        if not isinstance(line, str) or "\n" in line or "\r" in line or "\0" in line:
            raise InputError(f"{where}: setup line {i + 1} must be one line of text")
        lines.append(line)
    kw["setup"] = tuple(lines)
    env = raw.get("env", {}) or {}
    if not isinstance(env, dict):
        raise InputError(f"{where}: env must be a mapping NAME: value")
    env_items = []
    for k, v in env.items():
        if not isinstance(k, str) or not ENV_KEY_RE.match(k):
            raise InputError(f"{where}: env name {k!r} is not a valid variable name")
        env_items.append((k, check_value(v, f"{where}: env {k}")))
    kw["env"] = tuple(env_items)
    attrs = raw.get("attributes", {}) or {}
    if not isinstance(attrs, dict):
        raise InputError(f"{where}: attributes must be a mapping key: value")
    kw["attributes"] = tuple((_check_attr_key(k, f"{where}: attribute"), check_value(v, f"{where}: attribute {k}"))
                             for k, v in attrs.items())
    launcher = raw.get("launcher", "mpiexec")
    if launcher not in LAUNCHERS:
        raise InputError(f"{where}: launcher must be one of {', '.join(LAUNCHERS)}, got {launcher!r}")
    if launcher == "srun" and backend != "slurm":
        raise InputError(f"{where}: launcher srun needs backend slurm")
    kw["launcher"] = launcher
    for k in ("mpiexec", "python", "ppn_flag"):
        if raw.get(k) is not None:
            kw[k] = _check_pathlike(raw[k], f"{where}: {k}")
    margs = raw.get("mpiexec_args", []) or []
    if not isinstance(margs, list):
        raise InputError(f"{where}: mpiexec_args must be a list")
    kw["mpiexec_args"] = tuple(_check_pathlike(a, f"{where}: mpiexec_args") for a in margs)
    if raw.get("poll_interval") is not None:
        pi = raw["poll_interval"]
        if isinstance(pi, bool) or not isinstance(pi, (int, float)) or not 0.1 <= pi <= 600:
            raise InputError(f"{where}: poll_interval must be seconds between 0.1 and 600, got {pi!r}")
        kw["poll_interval"] = float(pi)
    return Profile(**kw)


def _check_attr_key(key: Any, what: str) -> str:
    if not isinstance(key, str) or not ATTR_KEY_RE.match(key):
        raise InputError(f"{what} name {key!r} is not allowed: letters, digits, _ and - only")
    return key


def _check_pathlike(value: Any, what: str) -> str:
    if not isinstance(value, (str, int)) or isinstance(value, bool) or not PATHLIKE_RE.match(str(value)):
        raise InputError(f"{what} {value!r} is not allowed: letters, digits and _ . , : = @ % + / - only")
    return str(value)


def load_profiles(project_root: str | Path | None = None) -> dict[str, Profile]:
    """Built-in profiles overridden/extended by ``PROJECT/profiles.yaml`` (if present)."""
    profiles = {name: make_profile(name, raw) for name, raw in BUILTIN.items()}
    if project_root is None:
        return profiles
    path = Path(project_root) / PROFILES_FILE
    if not path.exists():
        return profiles
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise InputError(f"{path}{where}: not valid YAML")
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})")
    if data is None:
        return profiles
    if not isinstance(data, dict) or not isinstance(data.get("profiles", {}), dict) or set(data) - {"profiles"}:
        raise InputError(f"{path}: expected a top-level 'profiles:' mapping of name → settings")
    for name, raw in (data.get("profiles") or {}).items():
        profiles[str(name)] = make_profile(str(name), raw, source=str(path))
    return profiles


def get_profile(project_root: str | Path | None, name: str) -> Profile:
    """The profile called ``name``; an unknown name is a one-line error listing the known ones."""
    if not isinstance(name, str) or not name:
        raise InputError("--backend: a profile name is required")
    profiles = load_profiles(project_root)
    if name not in profiles:
        raise EmloopError(f"--backend {name!r}: unknown profile (known: {', '.join(sorted(profiles))}; "
                          f"add it to {PROFILES_FILE} in the project)")
    return profiles[name]


def write_example_profiles(project_root: str | Path) -> Path:
    """Write ``PROJECT/profiles.yaml`` with the built-in examples (if it does not exist yet)."""
    path = Path(project_root) / PROFILES_FILE
    if path.exists():
        return path
    header = ("# emloop backend profiles (see launch/profiles.py). `local` is built in.\n"
              "# setup lines are shell run before the job starts (module loads, venv activation).\n")
    body = {"profiles": {k: v for k, v in BUILTIN.items() if k != "local"}}
    path.write_text(header + yaml.safe_dump(body, sort_keys=False))
    return path


__all__ = ["Profile", "BUILTIN", "BACKENDS", "LAUNCHERS", "PROFILES_FILE", "load_profiles", "get_profile",
           "make_profile", "parse_walltime", "format_walltime", "check_name", "check_value",
           "check_positive_int", "write_example_profiles", "venv_python", "venv_mpiexec"]
