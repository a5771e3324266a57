import json
import subprocess
import sys

import yaml

from tests.conftest import tiny_run_dict


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "calray.train", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def test_cli_trains_and_applies_overrides(tmp_path):
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_run_dict(tmp_path)))
    res = run_cli(str(cfg_path), "--set", "optim.epochs=1", "--set", "name=cli")
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "runs" / "cli" / "summary.json").read_text())
    assert summary["epochs_run"] == 1
    assert "test (best val epoch" in res.stdout


def test_cli_bad_key_is_one_line(tmp_path):
    tree = tiny_run_dict(tmp_path)
    tree["optim"]["lrr"] = 0.1
    cfg_path = tmp_path / "bad.yaml"
    cfg_path.write_text(yaml.safe_dump(tree))
    res = run_cli(str(cfg_path))
    assert res.returncode == 2
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "optim.lrr" in lines[0] and str(cfg_path) in lines[0]
