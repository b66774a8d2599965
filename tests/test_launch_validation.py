"""Job requests, profiles and rendered job scripts: validation and security (no scheduler needed)."""
import shlex
import subprocess
from pathlib import Path

import pytest

from launch import jobs, profiles
from pipeline_core.errors import EmloopError, GateError, InputError
from pipeline_core.project import Project

JOBPROGS = str(Path(__file__).resolve().parent / "jobprogs")


@pytest.fixture
def project(tmp_path):
    p = Project.init(tmp_path / "proj")
    p.catalog.create_run("montage", params={})
    return p


def _one_line(err: Exception) -> str:
    msg = str(err)
    assert "\n" not in msg and msg
    return msg


def _no_jobs(project):
    assert project.catalog.jobs() == []


# ------------------------------------------------------------------ bad input → refused before submitting


@pytest.mark.parametrize("ranks", [0, -1, "0", "two", "2; rm -rf ~", True, 1.5])
def test_bad_ranks_refused(project, ranks):
    with pytest.raises(InputError) as e:
        jobs.submit(project, 1, "local", ranks=ranks, module="mpi_probe")
    assert "--ranks" in _one_line(e.value)
    _no_jobs(project)


@pytest.mark.parametrize("walltime", ["abc", "1:60", "0", "0:00:00", "-5", "10:00:00:00", "1h", "", "1:2:3;ls",
                                      True, 0])
def test_bad_walltime_refused(project, walltime):
    with pytest.raises(InputError) as e:
        jobs.submit(project, 1, "local", ranks=1, walltime=walltime, module="mpi_probe")
    assert "--walltime" in _one_line(e.value)
    _no_jobs(project)


@pytest.mark.parametrize("text,seconds", [(30, 1800), ("30", 1800), ("1:30", 5400), ("0:00:05", 5),
                                          ("02:00:00", 7200), ("1-12", 129600), ("1-00:00:01", 86401)])
def test_walltime_forms(text, seconds):
    assert profiles.parse_walltime(text) == seconds


def test_unknown_profile_refused(project):
    with pytest.raises(EmloopError) as e:
        jobs.submit(project, 1, "nosuchcluster", ranks=2, module="mpi_probe")
    msg = _one_line(e.value)
    assert "nosuchcluster" in msg and "local" in msg
    _no_jobs(project)


EVIL = ["debug; rm -rf ~", "$(touch /tmp/pwned)", "`id`", "debug\nrm -rf ~", "a b", "x|y", "q&", "'quoted'",
        '"dq"', "../..", "-q", ""]


@pytest.mark.parametrize("value", EVIL)
def test_shell_metacharacters_in_queue_refused(project, value):
    with pytest.raises(InputError) as e:
        jobs.submit(project, 1, "slurm", ranks=2, queue=value, module="mpi_probe")
    _one_line(e.value)
    _no_jobs(project)


@pytest.mark.parametrize("value", [v for v in EVIL if v not in ("../..", "-q")])
def test_shell_metacharacters_in_params_refused(project, value):
    for kw in ({"account": value}, {"attributes": {"qos": value}}, {"env": {"FOO": value}},
               {"attributes": {value or "x;": "ok"}}):
        with pytest.raises(InputError) as e:
            jobs.submit(project, 1, "slurm", ranks=2, module="mpi_probe", **kw)
        _one_line(e.value)
    _no_jobs(project)


@pytest.mark.parametrize("backend,key", [("slurm", "output"), ("slurm", "chdir"), ("slurm", "export"),
                                         ("polaris", "o"), ("polaris", "V")])
def test_attributes_cannot_override_emloop_directives(project, backend, key):
    with pytest.raises(InputError) as e:
        jobs.render_job_script(project, 1, backend, ranks=4, attributes={key: "/tmp/x"})
    assert "set by emloop" in _one_line(e.value)


@pytest.mark.parametrize("name", ["LD_PRELOAD", "PATH", "BASH_ENV", "PYTHONSTARTUP"])
def test_loader_and_shell_variables_refused(project, name):
    with pytest.raises(InputError) as e:
        jobs.submit(project, 1, "local", ranks=1, module="mpi_probe", env={name: "/tmp/x"})
    assert name in _one_line(e.value)
    _no_jobs(project)


def test_log_dir_outside_project_refused(project, tmp_path):
    for bad in ("/etc", str(tmp_path), "../outside", "runs/../../x"):
        with pytest.raises(InputError) as e:
            jobs.submit(project, 1, "local", ranks=1, module="mpi_probe", log_dir=bad)
        assert "outside the project" in _one_line(e.value)
    _no_jobs(project)


def test_run_dir_symlink_escape_refused(project, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (project.root / "runs" / "1").symlink_to(outside)
    with pytest.raises(InputError) as e:
        jobs.submit(project, 1, "local", ranks=1, module="mpi_probe")
    assert "outside the project" in _one_line(e.value)
    _no_jobs(project)


def test_project_path_with_spaces_refused(tmp_path):
    p = Project.init(tmp_path / "my project")
    p.catalog.create_run("montage", params={})
    with pytest.raises(InputError) as e:
        jobs.submit(p, 1, "local", ranks=1, module="mpi_probe")
    assert "spaces or shell characters" in _one_line(e.value)


def test_unknown_run_and_bad_nodes(project):
    with pytest.raises(InputError):
        jobs.submit(project, 99, "local", ranks=1, module="mpi_probe")
    with pytest.raises(InputError) as e:
        jobs.submit(project, 1, "local", ranks=2, nodes=2, module="mpi_probe")
    assert "1 node" in _one_line(e.value)
    with pytest.raises(InputError) as e:
        jobs.submit(project, 1, "slurm", ranks=6, ranks_per_node=4, module="mpi_probe")
    assert "multiple" in _one_line(e.value)
    with pytest.raises(InputError) as e:
        jobs.submit(project, 1, "slurm", ranks=6, nodes=2, ranks_per_node=4, module="mpi_probe")
    _one_line(e.value)
    with pytest.raises(InputError) as e:
        jobs.submit(project, 1, "slurm", ranks=3, nodes=2, module="mpi_probe")
    assert "evenly" in _one_line(e.value)
    _no_jobs(project)


def test_module_name_must_be_a_module(project):
    with pytest.raises(InputError):
        jobs.submit(project, 1, "local", ranks=1, module="os; rm -rf ~")
    _no_jobs(project)


def test_missing_stage_entry_point_is_one_line(tmp_path):
    p = Project.init(tmp_path / "proj")
    p.catalog.create_run("finetune", params={})
    import importlib.util
    if importlib.util.find_spec("pipeline_core.stages.finetune") is not None:
        pytest.skip("finetune stage exists")
    with pytest.raises(EmloopError) as e:
        jobs.submit(p, 1, "local", ranks=1)
    assert "finetune" in _one_line(e.value)


def test_succeeded_run_cannot_be_resubmitted(project):
    project.catalog.set_run_state(1, "running")
    project.catalog.set_run_state(1, "succeeded")
    with pytest.raises(GateError) as e:
        jobs.submit(project, 1, "local", ranks=1, module="mpi_probe")
    assert "already succeeded" in _one_line(e.value)
    _no_jobs(project)


# ------------------------------------------------------------------ profiles


def test_builtin_profiles_listed(project):
    names = [p.name for p in jobs.list_profiles(project)]
    assert {"local", "slurm", "polaris"} <= set(names)
    assert {p.name: p.backend for p in jobs.list_profiles(project)}["polaris"] == "pbs"


def test_profiles_yaml_extends_and_overrides(project):
    (project.root / "profiles.yaml").write_text(
        "profiles:\n"
        "  bigslurm:\n    backend: slurm\n    partition: gpu\n    account: lab42\n    ranks_per_node: 4\n"
        "    walltime: '2:00:00'\n    attributes: {qos: high, constraint: a100}\n"
        "    env: {OMP_NUM_THREADS: 4}\n    setup: ['module load cuda']\n"
        "  local:\n    backend: local\n    ranks: 2\n")
    profs = {p.name: p for p in jobs.list_profiles(project)}
    big = profs["bigslurm"]
    assert big.queue == "gpu" and big.account == "lab42" and big.ranks_per_node == 4
    assert dict(big.attributes) == {"qos": "high", "constraint": "a100"}
    assert dict(big.env) == {"OMP_NUM_THREADS": "4"} and big.setup == ("module load cuda",)
    assert profs["local"].ranks == 2 and profs["local"].source.endswith("profiles.yaml")


@pytest.mark.parametrize("body,needle", [
    ("profiles:\n  x:\n    backend: lsf\n", "backend"),
    ("profiles:\n  x:\n    backend: slurm\n    queue: 'a;b'\n", "queue"),
    ("profiles:\n  x:\n    backend: slurm\n    ranks: 0\n", "ranks"),
    ("profiles:\n  x:\n    backend: slurm\n    walltime: soon\n", "walltime"),
    ("profiles:\n  x:\n    backend: slurm\n    colour: red\n", "colour"),
    ("profiles:\n  x:\n    backend: slurm\n    setup: [\"a\\nb\"]\n", "setup"),
    ("profiles:\n  x:\n    backend: slurm\n    mpiexec: 'mpiexec -n 2'\n", "mpiexec"),
    ("profiles:\n  x:\n    backend: local\n    launcher: srun\n", "srun"),
    ("profiles:\n  'bad name':\n    backend: slurm\n", "profile name"),
    ("profiles: [1, 2]\n", "profiles"),
    ("profiles:\n  x: {backend: slurm\n", "YAML"),
])
def test_bad_profiles_yaml_is_one_line(project, body, needle):
    (project.root / "profiles.yaml").write_text(body)
    with pytest.raises(InputError) as e:
        jobs.list_profiles(project)
    msg = _one_line(e.value)
    assert needle in msg and "profiles.yaml" in msg


def test_write_example_profiles_roundtrips(tmp_path):
    path = profiles.write_example_profiles(tmp_path)
    loaded = profiles.load_profiles(tmp_path)
    assert loaded["polaris"].source == str(path)
    assert loaded["polaris"].as_dict() | {"source": ""} == profiles.load_profiles()["polaris"].as_dict() | {"source": ""}


# ------------------------------------------------------------------ rendered job scripts (psij templates)


def _launch_words(script: str) -> list[str]:
    line = next(ln for ln in script.splitlines() if "launch.runner" in ln)
    return shlex.split(line)


def test_pbs_polaris_script_directives_and_launch_line(project):
    """PBS Pro is exercised here by rendering psij's pbs job script (no PBS server on this machine)."""
    script = jobs.render_job_script(project, 1, "polaris", ranks=8)
    lines = [ln.strip() for ln in script.splitlines()]
    assert lines[0] == "#!/bin/bash"
    assert "#PBS -l select=2:ncpus=4:mpiprocs=4" in lines
    assert "#PBS -l place=scatter:exclhost" in lines
    assert "#PBS -l walltime=0:30:0" in lines
    assert "#PBS -A MyAllocation" in lines
    assert "#PBS -q debug" in lines
    assert '#PBS -l "filesystems=home:eagle"' in lines
    assert '#PBS -N "em-montage-r1"' in lines
    words = _launch_words(script)
    # psij's single launcher, sourcing the profile's setup lines first, starts the runner once …
    assert words[0] == "/bin/bash" and words[1].endswith("single_launch.sh")
    assert words[4].endswith("runs/1/job-N.setup.sh")
    i = words.index("launch.runner")
    assert words[i - 2:i] == ["python", "-m"]
    # … which runs Cray mpiexec itself: ranks, ranks per node, binding, then the stage's MPI entry point
    j = words.index("--")
    assert words[j + 1:] == ["mpiexec", "-n", "8", "--ppn", "4", "--cpu-bind", "depth", "--depth", "16",
                             "python", "-m", "pipeline_core.stages.montage", "--project", str(project.root),
                             "--run", "1"]
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_pbs_profile_from_yaml_with_queue_override(project):
    (project.root / "profiles.yaml").write_text(
        "profiles:\n  aurora:\n    backend: pbs\n    queue: prod\n    account: EMproj\n    ranks_per_node: 12\n"
        "    exclusive: true\n    attributes: {l: 'filesystems=flare:home'}\n    mpiexec: mpiexec\n"
        "    ppn_flag: --ppn\n    python: python\n    setup: ['module load frameworks']\n")
    script = jobs.render_job_script(project, 1, "aurora", nodes=2, walltime="1:00:00", queue="debug-scaling")
    assert "#PBS -l select=2:ncpus=12:mpiprocs=12" in script
    assert "#PBS -q debug-scaling" in script and "#PBS -l walltime=1:0:0" in script
    words = _launch_words(script)
    assert words[words.index("--") + 1:][:5] == ["mpiexec", "-n", "24", "--ppn", "12"]


def test_slurm_script_quotes_every_argument(project):
    script = jobs.render_job_script(project, 1, "slurm", ranks=2, walltime="0:10:00", queue="debug",
                                    attributes={"qos": "normal"}, env={"EMLOOP_NOTE": "a=b,c:d"})
    assert '#SBATCH --partition="debug"' in script
    assert '#SBATCH --ntasks=2' in script and "#SBATCH --time=0:10:0" in script
    assert '#SBATCH --qos="normal"' in script
    assert "export EMLOOP_NOTE=a=b,c:d" in script
    words = _launch_words(script)
    j = words.index("--")
    assert words[j + 2:j + 4] == ["-n", "2"] and words[-4:] == ["--project", str(project.root), "--run", "1"]
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_srun_launcher_line(project):
    (project.root / "profiles.yaml").write_text("profiles:\n  s:\n    backend: slurm\n    launcher: srun\n")
    words = _launch_words(jobs.render_job_script(project, 1, "s", ranks=4, ranks_per_node=2))
    assert words[words.index("--") + 1:][:5] == ["srun", "--mpi=pmi2", "-n", "4", "--ntasks-per-node=2"]
