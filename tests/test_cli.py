"""The command line: `fusedgpt info` (console script and python -m fusedgpt) reports versions, extension and
backends; --version and the help texts; `fusedgpt generate` checks its arguments before it prints anything."""

import subprocess
import sys

import pytest
import torch

import fusedgpt
from fusedgpt.cli import DESCRIPTION, build_parser, main


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


def test_version():
    result = subprocess.run([sys.executable, "-m", "fusedgpt", "--version"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == f"fusedgpt {fusedgpt.__version__}"


def _subparsers(parser):
    import argparse

    return next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction)).choices


def test_every_option_and_command_has_a_whole_help_text(capsys):
    parser = build_parser()
    with pytest.raises(SystemExit) as exit_code:
        main(["--help"])
    assert exit_code.value.code == 0
    text = capsys.readouterr().out
    assert DESCRIPTION.splitlines()[0] in text and "generate" in text and "info" in text and "--version" in text
    for name, subparser in _subparsers(parser).items():
        assert subparser.description and subparser.description.rstrip().endswith("."), name
        for action in subparser._actions:
            if action.option_strings or action.dest != "help":
                assert action.help, f"fusedgpt {name} {action.option_strings or action.dest} has no help text"
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = capsys.readouterr().out
    assert "how many tokens to generate" in text and "examples:" in text


@pytest.mark.parametrize("arguments, message", [
    (["--max-new-tokens", "0"], "max_new_tokens must be a positive int, got 0"),
    (["--temperature", "-1"], "--temperature must be >= 0 (0: greedy), got -1.0"),
    (["--temperature", "nan"], "--temperature must be >= 0"),
    (["--top-k", "0"], "top_k must be a positive int or None, got 0"),
    (["--top-p", "1.5"], "top_p must be in (0, 1] or None, got 1.5"),
    (["--max-new-tokens", "500", "--temperature", "0"], "positions"),
])
def test_bad_arguments_fail_before_the_prompt_is_echoed(capsys, arguments, message):
    assert main(["generate", "Once upon a time", "--device", "cpu"] + arguments) == 1
    captured = capsys.readouterr()
    assert captured.out == ""  # the prompt appears with the first generated token, after every check
    assert captured.err.startswith("fusedgpt generate: error:") and message in captured.err
    assert captured.err.count("\n") == 1


def test_prompt_then_text_on_one_line(capsys):
    assert main(["generate", "Once upon a time", "--device", "cpu", "--temperature", "0", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Once upon a time") and len(out) > len("Once upon a time\n") and out.count("\n") == 1
