"""The CLI reads the environment only inside the command that needs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.cli import SUBCOMMANDS
from deploy.cli import main as tallyflow

REPO = Path(__file__).resolve().parents[1]
BOGUS = {"WINDOW_SIZE": "bogus", "KAFKA_BATCH_SIZE": "many", "METRICS_PORT": "port", "REDIS_URL": "http://x"}


def test_help_prints_with_a_bad_setting_in_the_environment():
    env = {**os.environ, **BOGUS, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "deploy.cli", "--help"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: tallyflow") and "reconcile" in result.stdout
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_every_subcommand_help_prints_with_a_bad_setting(command, monkeypatch, capsys):
    for name, value in BOGUS.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as stopped:
        tallyflow([command, "--help"])
    assert stopped.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: tallyflow {command}")


def test_the_command_that_needs_a_setting_names_the_bad_one(monkeypatch, capsys):
    monkeypatch.setenv("WINDOW_SIZE", "bogus")
    assert tallyflow(["reconcile", "--bootstrap", "127.0.0.1:1"]) == 1
    err = capsys.readouterr().err
    assert "WINDOW_SIZE: not a duration: 'bogus'" in err and "Traceback" not in err
