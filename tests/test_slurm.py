"""scripts/slurm/calray_sweep.sbatch's launch sequence, run by bash with recording stand-ins for
srun, scontrol, hostname, ray and python on PATH (SLURM cannot run here): which commands run, in
which order, with which arguments, and that the Ray nodes are stopped whatever the sweep's status."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SBATCH = REPO / "scripts" / "slurm" / "calray_sweep.sbatch"

STANDINS = {
    # srun: record, drop its own options, run the command (the stand-ins below) on "the node"
    "srun": """
echo "srun $*" >> "$RECORD"
node=""
while [[ $# -gt 0 && "$1" == -* ]]; do
    case "$1" in -w) node=$2; shift 2;; *) shift;; esac
done
export STANDIN_NODE=$node
exec "$@"
""",
    "scontrol": """
echo "scontrol $*" >> "$RECORD"
[[ "$1 $2 $3" == "show hostnames gpu[01-03]" ]] && printf 'gpu01\\ngpu02\\ngpu03\\n'
""",
    "hostname": """
echo "hostname $* on $STANDIN_NODE" >> "$RECORD"
echo "fe80::1 10.0.0.$(( ${STANDIN_NODE#gpu} ))"
""",
    # ray start --block: a node that runs until its srun step is ended; ray status: the head answers
    "ray": """
if [[ "$1" == status ]]; then
    [[ -e "$RECORD.head" ]] || exit 1  # answers once the head runs
    echo "ray $* (token ${#RAY_AUTH_TOKEN})" >> "$RECORD"; exit 0
fi
echo "ray $* on $STANDIN_NODE (auth $RAY_AUTH_MODE, token ${#RAY_AUTH_TOKEN})" >> "$RECORD"
[[ "$2" == --head ]] && touch "$RECORD.head"
trap 'echo "ray stopped on $STANDIN_NODE" >> "$RECORD"; exit 0' TERM
while true; do sleep 0.1; done
""",
    "python": """
if [[ "$1" == -c ]]; then exec /usr/bin/env -i PATH=/usr/bin:/bin python3 "$@"; fi
echo "python $* (token ${#RAY_AUTH_TOKEN})" >> "$RECORD"
exit "${SWEEP_STATUS:-0}"
""",
}


@pytest.fixture
def standins(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in STANDINS.items():
        p = bin_dir / name
        p.write_text("#!/bin/bash\n" + body.lstrip())
        p.chmod(p.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def _run(tmp_path, standins, *args, status=0, **env):
    record = tmp_path / "record.txt"
    record.write_text("")
    full_env = {"PATH": f"{standins}:/usr/bin:/bin", "RECORD": str(record), "SLURM_JOB_NODELIST": "gpu[01-03]",
                "SLURM_JOB_NUM_NODES": "3", "SLURM_CPUS_PER_TASK": "16", "SLURM_GPUS_PER_TASK": "4",
                "CALRAY_NODE_WAIT_S": "1", "SWEEP_STATUS": str(status), "HOME": str(tmp_path), **env}
    proc = subprocess.Popen(["bash", str(SBATCH), *args], env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=60)
    finally:  # stand-in nodes the script failed to stop must not outlive the test
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    r = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return r, record.read_text().splitlines()


def test_launch_sequence_head_workers_sweep_then_stop(tmp_path, standins):
    r, lines = _run(tmp_path, standins, "sweeps/nyud2_noise.yaml", "--resume", "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    res = "--num-cpus 16 --num-gpus 4"
    addr = "10.0.0.1:6379"
    assert lines[:-3] == [
        "scontrol show hostnames gpu[01-03]",
        "srun --nodes=1 --ntasks=1 -w gpu01 hostname --ip-address",
        "hostname --ip-address on gpu01",  # "fe80::1 10.0.0.1": the IPv4 address is taken
        f"srun --nodes=1 --ntasks=1 -w gpu01 ray start --head --node-ip-address=10.0.0.1 --port=6379 {res} --block",
        f"ray start --head --node-ip-address=10.0.0.1 --port=6379 {res} --block on gpu01 (auth token, token 64)",
        f"ray status --address {addr} (token 64)",  # the workers join once the head answers
        f"srun --nodes=1 --ntasks=1 -w gpu02 ray start --address {addr} {res} --block",
        f"ray start --address {addr} {res} --block on gpu02 (auth token, token 64)",
        f"srun --nodes=1 --ntasks=1 -w gpu03 ray start --address {addr} {res} --block",
        f"ray start --address {addr} {res} --block on gpu03 (auth token, token 64)",
        f"python -m calray.sweep sweeps/nyud2_noise.yaml --address {addr} --resume --quiet (token 64)",
    ], lines
    # then every node's Ray is stopped (its srun step ended), never with `ray stop`
    assert sorted(lines[-3:]) == [f"ray stopped on gpu0{k}" for k in (1, 2, 3)], lines


def test_sweep_status_is_the_jobs_and_ray_is_stopped_anyway(tmp_path, standins):
    r, lines = _run(tmp_path, standins, status=3, SWEEP="sweeps/quickstart.yaml", SLURM_GPUS_PER_TASK="0",
                    RAY_AUTH_TOKEN="ab" * 32, CALRAY_RAY_PORT="6400")
    assert r.returncode == 3, r.stdout + r.stderr
    assert "python -m calray.sweep sweeps/quickstart.yaml --address 10.0.0.1:6400 (token 64)" in lines
    assert any(ln.startswith("ray start --head --node-ip-address=10.0.0.1 --port=6400 --num-cpus 16 --block")
               for ln in lines), lines  # no --num-gpus without GPUs
    assert sorted(ln for ln in lines if ln.startswith("ray stopped")) == [f"ray stopped on gpu0{k}" for k in (1, 2, 3)]


def test_missing_sweep_is_a_usage_error(tmp_path, standins):
    r, lines = _run(tmp_path, standins)
    assert r.returncode == 2 and "usage: sbatch calray_sweep.sbatch SWEEP.yaml" in r.stderr and lines == []


def test_head_that_never_answers_fails_and_stops_it(tmp_path, standins):
    ray = (standins / "ray").read_text()
    (standins / "ray").write_text(ray.replace('[[ -e "$RECORD.head" ]] || exit 1', 'exit 1'))
    r, lines = _run(tmp_path, standins, "s.yaml", CALRAY_HEAD_TIMEOUT_S="1")
    assert r.returncode == 1 and "did not answer within 1s" in r.stderr
    assert not any(ln.startswith("python") for ln in lines) and "ray stopped on gpu01" in lines


@pytest.mark.skipif(os.name != "posix", reason="bash")
def test_script_is_executable_bash():
    assert SBATCH.stat().st_mode & stat.S_IXUSR and SBATCH.read_text().startswith("#!/bin/bash")
