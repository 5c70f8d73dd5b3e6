"""Every code block in README.md runs, so the README cannot drift from the code.

Python and shell blocks run here in a subprocess, as a user would run them: without the test suite's
TRITON_INTERPRET=1, with this interpreter's bin folder on PATH (for the `fusedgpt` command). Each
`path/to/NAME` in a block becomes a tiny random checkpoint of that family (GPT-2, OPT, GPT-Neo) saved to
a temporary directory, with the embedded model's tokenizer files. The set-up block and the user-install
block install packages, so .ci/run runs them verbatim in fresh environments instead; the tests here check
that it does, and that the set-up block is the two commands the README promises."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import readme
import torch
import transformers

from fusedgpt.models.tiny import TINY_MODEL_DIR

CI_SCRIPT = pathlib.Path(__file__).resolve().parent.parent / ".ci" / "run"
INSTALL_HEADING = "Install into your own environment"
RUN_BY_CI = {readme.SETUP_HEADING, INSTALL_HEADING}  # .ci/run runs these blocks verbatim
OUTPUT_LANGUAGES = {"text"}  # transcripts of a run, not commands
CHECKPOINT = re.compile(r"path/to/([\w.-]+)")

BLOCKS = readme.blocks()
RUNNABLE = [block for block in BLOCKS if block.language not in OUTPUT_LANGUAGES and block.heading not in RUN_BY_CI]


def test_setup_block_is_one_install_and_one_test_command():
    commands = readme.setup_block().commands()
    assert len(commands) == 2, commands
    install, test = commands
    assert install.startswith("pip install ") and "-e \".[test]\"" in install, install
    assert test == "python -m pytest", test


def test_every_block_is_python_shell_or_output():
    assert {block.language for block in BLOCKS} <= {"python", "bash"} | OUTPUT_LANGUAGES, \
        [(block.line, block.language) for block in BLOCKS]
    assert {block.heading for block in BLOCKS if block.heading in RUN_BY_CI} == RUN_BY_CI
    assert any(block.language == "python" for block in RUNNABLE) and any(block.language == "bash" for block in RUNNABLE)


def test_ci_runs_the_install_blocks_verbatim_before_setting_anything():
    script = CI_SCRIPT.read_text()
    assert "run_readme_block setup" in script and f'run_readme_block "{INSTALL_HEADING}"' in script
    assert 'commands=$(python3 tests/readme.py "$1")' in script
    before_setup = script[:script.index("run_readme_block setup\n")]
    # No exported variable and no VAR=value prefix may change what the newcomer's commands do.
    assert not re.search(r"^\s*export\s", before_setup, flags=re.MULTILINE), "CI exports a variable before the README"
    assert "FUSEDGPT_" not in before_setup.replace("FUSEDGPT_CI_VENV", ""), "CI sets a fusedgpt variable"
    assert "TORCH_CUDA_ARCH_LIST" not in before_setup and "CUDA_HOME" not in before_setup


def test_readme_command_line_prints_its_commands(tmp_path):
    result = subprocess.run([sys.executable, str(readme.__file__), "setup"], capture_output=True, text=True,
                            check=True)
    assert result.stdout.splitlines() == readme.setup_block().commands()
    broken = tmp_path / "README.md"
    broken.write_text("## Set up and run the tests\n\n```bash\npip install x\n")
    with pytest.raises(ValueError, match="never closed"):
        readme.blocks(broken)


# ---- running the blocks ----------------------------------------------------------------------------

def _tiny_checkpoint(name: str, directory: pathlib.Path) -> None:
    """A random 2-layer model of the family `name` starts with, with the embedded model's tokenizer."""
    vocab = json.loads((TINY_MODEL_DIR / "config.json").read_text())["vocab_size"]
    shared = dict(vocab_size=vocab, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if name.startswith("gpt2"):
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                                                     **shared))
    elif name.startswith("opt"):
        model = transformers.OPTForCausalLM(transformers.OPTConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128, max_position_embeddings=256,
            word_embed_proj_dim=64, **shared))
    elif name.startswith("gpt-neo"):
        model = transformers.GPTNeoForCausalLM(transformers.GPTNeoConfig(
            hidden_size=64, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]], window_size=16,
            max_position_embeddings=256, **shared))
    else:
        raise AssertionError(f"README names path/to/{name}: give the test a family for it")
    torch.manual_seed(0)
    model.save_pretrained(directory)
    shutil.copy(TINY_MODEL_DIR / "tokenizer.json", directory)
    settings = json.loads((TINY_MODEL_DIR / "tokenizer_config.json").read_text())
    settings.update(pad_token=settings["eos_token"], add_bos_token=False)
    (directory / "tokenizer_config.json").write_text(json.dumps(settings))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("readme-checkpoints")
    names = sorted({name for block in RUNNABLE for name in CHECKPOINT.findall(block.code)})
    for name in names:
        _tiny_checkpoint(name, root / name)
    return {name: root / name for name in names}


def _user_environment() -> dict[str, str]:
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("TRITON_INTERPRET", "FUSEDGPT_BACKEND", "PYTEST_CURRENT_TEST")}
    environment["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), environment.get("PATH", "")])
    return environment


@pytest.mark.parametrize("block", RUNNABLE, ids=[f"line{block.line}-{block.language}" for block in RUNNABLE])
def test_block_runs(block, checkpoints, tmp_path):
    code = CHECKPOINT.sub(lambda match: str(checkpoints[match.group(1)]), block.code)
    command = [sys.executable, "-c", code] if block.language == "python" else ["bash", "-euo", "pipefail", "-c", code]
    result = subprocess.run(command, cwd=tmp_path, env=_user_environment(), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, f"README.md line {block.line} failed:\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
