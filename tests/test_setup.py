"""setup.py's checks, which run before anything compiles: the architecture list in every spelling a user
can give (and the one-line errors for a bad one), the CUDA toolkit behind a wrapper `nvcc` or a wrong
CUDA_HOME, the reasons the extension is skipped, and the architecture token that reaches csrc/ops.cpp."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("fusedgpt_setup", ROOT / "setup.py")
setup = importlib.util.module_from_spec(spec)
spec.loader.exec_module(setup)  # defines the helpers; setup() itself runs only as a script

KNOWN = {75, 80, 86, 87, 88, 89, 90, 100, 103, 110, 120, 121}  # nvcc 13.0's --list-gpu-arch


@pytest.mark.parametrize("spec, expected", [
    (setup.DEFAULT_CUDA_ARCHS, ["8.0", "8.6", "8.9", "9.0+PTX"]),
    ("8.0;9.0+PTX", ["8.0", "9.0+PTX"]),
    ("80,90", ["8.0", "9.0"]),
    ("9.0", ["9.0"]),
    ("90", ["9.0"]),
    (" sm_80, compute_86  9.0a+ptx ", ["8.0", "8.6", "9.0a+PTX"]),
    ("100;12.0", ["10.0", "12.0"]),
    ("8.0;8.0;80", ["8.0"]),
])
def test_architecture_spellings(spec, expected):
    assert setup.normalise_archs(spec, "FUSEDGPT_CUDA_ARCHS") == expected


@pytest.mark.parametrize("spec, message", [
    ("ampere", "cannot read 'ampere'"),
    ("8.0;9.x", "cannot read '9.x'"),
    ("9", "'9' is not an architecture; did you mean 9.0?"),
    (" ;, ", "names no architecture"),
])
def test_unreadable_architectures_are_one_line_errors(spec, message):
    with pytest.raises(SystemExit) as error:
        setup.normalise_archs(spec, "FUSEDGPT_CUDA_ARCHS")
    text = str(error.value)
    assert text.startswith("fusedgpt setup: error: FUSEDGPT_CUDA_ARCHS=") and message in text and "\n" not in text


def test_choose_archs_order_of_variables():
    assert setup.choose_archs({}, KNOWN) == ["8.0", "8.6", "8.9", "9.0+PTX"]
    assert setup.choose_archs({"TORCH_CUDA_ARCH_LIST": "8.6"}, KNOWN) == ["8.6"]
    assert setup.choose_archs({"FUSEDGPT_CUDA_ARCHS": "9.0", "TORCH_CUDA_ARCH_LIST": "8.6"}, KNOWN) == ["9.0"]
    assert setup.choose_archs({"FUSEDGPT_CUDA_ARCHS": "  ", "TORCH_CUDA_ARCH_LIST": "8.6"}, KNOWN) == ["8.6"]
    assert setup.choose_archs({"FUSEDGPT_CUDA_ARCHS": "9.5"}, None) == ["9.5"]  # an nvcc that cannot list


def test_old_architectures(capsys):
    with pytest.raises(SystemExit, match=r"FUSEDGPT_CUDA_ARCHS='7.5;8.0': 7.5 is older than sm_80"):
        setup.choose_archs({"FUSEDGPT_CUDA_ARCHS": "7.5;8.0"}, KNOWN)
    # TORCH_CUDA_ARCH_LIST is shared with other packages: its old entries are left out, with a note
    assert setup.choose_archs({"TORCH_CUDA_ARCH_LIST": "7.0;7.5;8.0"}, KNOWN) == ["8.0"]
    assert "leaving out 7.0;7.5 from TORCH_CUDA_ARCH_LIST" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="TORCH_CUDA_ARCH_LIST='7.5' has no architecture of sm_80 or newer"):
        setup.choose_archs({"TORCH_CUDA_ARCH_LIST": "7.5"}, KNOWN)


def test_architecture_this_nvcc_does_not_know():
    with pytest.raises(SystemExit, match=r"FUSEDGPT_CUDA_ARCHS='9.5': this nvcc cannot compile for 9.5 \(it knows 75, "):
        setup.choose_archs({"FUSEDGPT_CUDA_ARCHS": "9.5"}, KNOWN)


@pytest.mark.parametrize("archs, tag", [
    (["8.0", "8.6", "8.9", "9.0+PTX"], "80_86_89_90ptx"),
    (["9.0a"], "90a"),
    (["10.0", "12.0+PTX"], "100_120ptx"),
])
def test_architecture_token_survives_argument_parsing(archs, tag):
    """One token of letters, digits and '_': nothing nvcc, ninja or a shell would split or quote."""
    assert setup.arch_tag(archs) == tag


def test_architecture_token_compiles_into_cuda_archs(tmp_path):
    """The define, passed the way setup.py passes it, comes back out of ops.cpp's cuda_archs() as a list."""
    source = tmp_path / "archs.cpp"
    ops = (ROOT / "csrc" / "ops.cpp").read_text()
    start, end = ops.index("#ifndef FUSEDGPT_CUDA_ARCHS"), ops.index("}  // namespace\n}  // namespace fusedgpt")
    source.write_text("#include <cstdio>\n#include <string>\n" + ops[start:end] + "}}\n"
                      "int main() { std::puts(fusedgpt::cuda_archs().c_str()); }\n")
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no host C++ compiler")
    binary = tmp_path / "archs"
    tag = setup.arch_tag(setup.normalise_archs(setup.DEFAULT_CUDA_ARCHS, "default"))
    subprocess.run([compiler, "-std=c++17", f"-DFUSEDGPT_CUDA_ARCHS={tag}", str(source), "-o", str(binary)], check=True)
    assert subprocess.run([str(binary)], capture_output=True, text=True, check=True).stdout.strip() == "80,86,89,90ptx"


# ---- the CUDA toolkit ------------------------------------------------------------------------------

def _fake_toolkit(root: pathlib.Path, *, runtime: bool = True, headers: bool = True) -> pathlib.Path:
    """A folder laid out like a CUDA toolkit, whose bin/nvcc answers a dry run the way nvcc does."""
    (root / "bin").mkdir(parents=True)
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho '#$ _HERE_={root / 'bin'}' >&2\necho 'compute_80 compute_90'\n")
    nvcc.chmod(0o755)
    if headers:
        (root / "include").mkdir()
        (root / "include" / "cuda_runtime.h").write_text("")
    if runtime:
        (root / "lib64").mkdir()
        (root / "lib64" / "libcudart.so").write_text("")
    return root


def _wrapper(folder: pathlib.Path, target: pathlib.Path) -> pathlib.Path:
    """A small `nvcc` script outside the toolkit, as on our machines (/usr/local/bin/nvcc)."""
    folder.mkdir(parents=True, exist_ok=True)
    wrapper = folder / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {target} "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def test_wrapper_nvcc_leads_to_its_toolkit(tmp_path):
    toolkit = _fake_toolkit(tmp_path / "cuda-13.0")
    wrapper = _wrapper(tmp_path / "usr" / "local" / "bin", toolkit / "bin" / "nvcc")
    # torch's own guess would be the wrapper's parent folder, tmp/usr/local, which holds no toolkit
    assert setup.find_cuda_home({}, which=lambda name: str(wrapper)) == (str(toolkit), "")
    assert setup.nvcc_known_archs(str(wrapper)) == {80, 90}


def test_real_wrapper_nvcc_leads_to_the_real_toolkit(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("no nvcc on PATH")
    home, reason = setup.find_cuda_home({}, which=lambda name: str(_wrapper(tmp_path, pathlib.Path(nvcc))))
    assert reason == "" and setup.toolkit_problem(home) is None
    assert 80 in setup.nvcc_known_archs(os.path.join(home, "bin", "nvcc"))


@pytest.mark.parametrize("runtime, headers, problem", [
    (True, True, None),
    (False, True, "no lib64/libcudart.so in"),
    (True, False, "no include/cuda_runtime.h in"),
])
def test_cuda_home_must_hold_a_toolkit(tmp_path, runtime, headers, problem):
    toolkit = _fake_toolkit(tmp_path / "cuda", runtime=runtime, headers=headers)
    if problem is None:
        assert setup.find_cuda_home({"CUDA_HOME": str(toolkit)}) == (str(toolkit), "")
        return
    with pytest.raises(SystemExit) as error:
        setup.find_cuda_home({"CUDA_HOME": str(toolkit)})
    text = str(error.value)
    assert text.startswith(f"fusedgpt setup: error: CUDA_HOME={toolkit}: {problem}") and "\n" not in text
    assert "FUSEDGPT_SKIP_CUDA_BUILD=1" in text


def test_cuda_home_without_nvcc(tmp_path):
    with pytest.raises(SystemExit, match=f"CUDA_PATH={tmp_path}: no bin/nvcc in {tmp_path}"):
        setup.find_cuda_home({"CUDA_PATH": str(tmp_path)})


def test_wrapper_to_a_broken_toolkit_is_an_error(tmp_path):
    toolkit = _fake_toolkit(tmp_path / "cuda", runtime=False)
    wrapper = _wrapper(tmp_path / "bin", toolkit / "bin" / "nvcc")
    with pytest.raises(SystemExit, match=r"the nvcc on PATH \(.*\) runs from .*, but no lib64/libcudart.so in .*; "
                                         "set CUDA_HOME"):
        setup.find_cuda_home({}, which=lambda name: str(wrapper))


def test_no_nvcc_means_no_extension(monkeypatch):
    monkeypatch.setattr(setup.os.path, "isfile", lambda path: False)
    home, reason = setup.find_cuda_home({}, which=lambda name: None)
    assert home is None and "no nvcc found" in reason and "CUDA_HOME" in reason


def test_skip_and_cpu_only_reasons(monkeypatch):
    assert setup.cuda_extension_or_reason({"FUSEDGPT_SKIP_CUDA_BUILD": "1"}) == (None, "FUSEDGPT_SKIP_CUDA_BUILD is set")
    import torch

    monkeypatch.setattr(torch.version, "cuda", None)
    ext, reason = setup.cuda_extension_or_reason({})
    assert ext is None and "CPU-only build" in reason and "CUDA build of torch" in reason


@pytest.mark.parametrize("variable, value, message", [
    ("FUSEDGPT_CUDA_ARCHS", "8.0;ampere", "FUSEDGPT_CUDA_ARCHS='8.0;ampere': cannot read 'ampere'"),
    ("FUSEDGPT_CUDA_ARCHS", "7.0", "FUSEDGPT_CUDA_ARCHS='7.0': 7.0 is older than sm_80"),
    ("CUDA_HOME", "/nonexistent/cuda", "CUDA_HOME=/nonexistent/cuda: no bin/nvcc in /nonexistent/cuda"),
])
def test_setup_script_stops_before_compiling(variable, value, message):
    """As pip runs it: the script exits with one line, before any compiler starts."""
    import torch

    if torch.version.cuda is None:
        pytest.skip("a CPU-only torch skips the extension before these checks")
    if variable != "CUDA_HOME" and shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        pytest.skip("no CUDA toolkit: the architecture checks are not reached")
    environment = {key: item for key, item in os.environ.items() if key not in ("FUSEDGPT_SKIP_CUDA_BUILD",)}
    environment[variable] = value
    result = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, env=environment, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1, result
    lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert lines == [f"fusedgpt setup: error: {message}" + lines[0].split(message, 1)[1]], result.stderr
    assert "nvcc -" not in result.stdout + result.stderr  # nothing compiled


def test_failed_build_says_what_failed_and_how_to_skip(monkeypatch, capsys):
    """The build command's account of a failure: architectures, nvcc, and FUSEDGPT_SKIP_CUDA_BUILD=1."""
    import torch

    if torch.version.cuda is None or (shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME")):
        pytest.skip("needs a CUDA build of torch and a CUDA toolkit")
    from setuptools import Distribution
    from torch.utils import cpp_extension

    # cuda_extension_or_reason sets these for the build; monkeypatch puts them back afterwards
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", os.environ.get("TORCH_CUDA_ARCH_LIST", ""))
    monkeypatch.setenv("CUDA_HOME", os.environ.get("CUDA_HOME", ""))
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", cpp_extension.CUDA_HOME)
    extensions, commands = setup.cuda_extension_or_reason({"FUSEDGPT_CUDA_ARCHS": "9.0"})
    assert [extension.name for extension in extensions] == ["fusedgpt._C"]
    command_class = commands["build_ext"]

    def compiler_fails(self):
        raise RuntimeError("Error compiling objects for extension\nmore detail")

    monkeypatch.setattr(command_class.__mro__[1], "build_extensions", compiler_fails)
    capsys.readouterr()
    with pytest.raises(RuntimeError, match="Error compiling objects"):
        command_class(Distribution()).build_extensions()
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3, err
    assert err[0].startswith("fusedgpt setup: the CUDA extension fusedgpt._C failed to build for 9.0 with ")
    assert err[0].endswith("bin/nvcc: Error compiling objects for extension")
    assert "FAILED:" in err[1] and "FUSEDGPT_SKIP_CUDA_BUILD=1 pip install" in err[2]


def test_old_setuptools_is_a_one_line_error():
    with pytest.raises(SystemExit, match=r"setuptools 65\.5\.0 is too old to build fusedgpt \(needs >= 77\); "
                                         r"pip install 'setuptools>=77'"):
        setup.check_setuptools("65.5.0")
    setup.check_setuptools("77.0.1")
    setup.check_setuptools("84.2.1")


def test_every_package_folder_is_installed():
    """A package folder missing from setup.py's explicit list is left out of `pip install .` (an editable
    install and the tests would not notice): every folder with an __init__.py must be listed."""
    package_root = ROOT / "python" / "fusedgpt"
    found = {".".join(("fusedgpt",) + path.parent.relative_to(package_root).parts)
             for path in package_root.rglob("__init__.py")}
    found.add("fusedgpt.triton_kernels")  # triton_kernels/, mapped into the package by package_dir
    assert "fusedgpt.patching" in found
    assert found <= set(setup.PACKAGES), sorted(found - set(setup.PACKAGES))
