"""`fusedgpt info` (console script and python -m fusedgpt) reports versions, extension and backends."""

import subprocess
import sys

import torch

from fusedgpt.cli import main


def test_info_lists_versions_extension_and_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"torch         {torch.__version__}" in out
    assert "triton" in out and "extension" in out
    for family in ("layer_norm", "bias_act", "kv_append"):
        assert any(line.startswith(family) for line in out.splitlines()), family


def test_python_dash_m_fusedgpt_info_runs():
    result = subprocess.run([sys.executable, "-m", "fusedgpt", "info"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "fusedgpt      0.1.0" in result.stdout


def test_unknown_command_is_a_usage_error():
    result = subprocess.run([sys.executable, "-m", "fusedgpt", "frobnicate"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2 and "invalid choice" in result.stderr
