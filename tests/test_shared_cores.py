"""Every trip command runs with OMP_WAIT_POLICY=PASSIVE unless the user set a policy: the CLI sets it before
anything imports torch (OpenMP reads it once, when torch loads it)."""

import os
import subprocess
import sys

from trip.cli import main


def test_importing_the_cli_leaves_torch_unloaded():
    probe = "import sys, trip.cli; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout == "False\n"


def test_a_command_sets_the_passive_wait_policy_and_keeps_the_users(monkeypatch, capsys):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert main(["data", "list"]) == 0
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert main(["data", "list"]) == 0
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
