"""Build script for fusedgpt: the Python package plus the optional CUDA extension `fusedgpt._C`.

    pip install --no-build-isolation -e ".[test]"     # the README's install; or `pip install .`

The extension is compiled against the torch already installed (hence --no-build-isolation; a plain
`pip install .` builds against a torch that pip installs in an isolated build environment) for the
architectures in FUSEDGPT_CUDA_ARCHS (else TORCH_CUDA_ARCH_LIST, else DEFAULT_CUDA_ARCHS). MAX_JOBS caps
the parallel nvcc jobs. Everything the build needs is checked before anything compiles, and a problem
is one line naming the variable to change: an unreadable or unknown architecture, one older than sm_80,
a CUDA_HOME without a toolkit. With FUSEDGPT_SKIP_CUDA_BUILD=1, without nvcc, or with a CPU-only torch
the package installs its Triton and PyTorch paths only, says so here, and `fusedgpt info` says so too.

The helpers below are plain functions so that tests/test_setup.py can call them; `setup()` runs only
when setuptools executes this file as a script.
"""

import glob
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
# Machine code for A100 (8.0), RTX 30xx / A10 (8.6), RTX 40xx / L4 / L40 (8.9) and H100 / H200 (9.0), plus
# compute_90 PTX that newer GPUs compile when the library loads. About 2 minutes on 2 cores.
DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0+PTX"
OLDEST_ARCH = 80  # mma.sync.m16n8k16 on bf16
NVCC_FLAGS = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]  # also what bench/static_report.py compiles with
# Listed explicitly (CONVENTIONS.md); tests/test_setup.py checks that every package folder is here.
PACKAGES = ["fusedgpt", "fusedgpt.ops", "fusedgpt.nn", "fusedgpt.models", "fusedgpt.patching",
            "fusedgpt.triton_kernels", "fusedgpt.data"]
SKIP_VARIABLE = "FUSEDGPT_SKIP_CUDA_BUILD"
HOW_TO_SKIP = (f"to install without the CUDA extension (Triton and PyTorch backends only), set "
               f"{SKIP_VARIABLE}=1")


class SetupError(SystemExit):
    """A problem found before compiling: one line, naming the variable to change."""

    def __init__(self, message: str):
        super().__init__(f"fusedgpt setup: error: {message}")


def say(message: str) -> None:
    print(f"fusedgpt setup: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------
# Architectures
# ----------------------------------------------------------------------------------------------------

def normalise_archs(spec: str, variable: str) -> list[str]:
    """'80, sm_86 9.0+PTX' -> ['8.0', '8.6', '9.0+PTX'] (torch's TORCH_CUDA_ARCH_LIST spelling).

    Items are separated by ';', ',' or spaces; each is 8.0, 80, sm_80, compute_80, with an optional
    a / f suffix (9.0a) and +PTX. Anything else raises SetupError naming `variable`."""
    archs = []
    for item in re.split(r"[;,\s]+", spec.strip()):
        if not item:
            continue
        match = re.fullmatch(r"(?:sm_|compute_)?(\d+)(?:\.(\d))?([af])?(\+ptx)?", item, flags=re.IGNORECASE)
        if match is None:
            raise SetupError(f"{variable}={spec!r}: cannot read {item!r}; give architectures like 8.0, 80, sm_90 "
                             f"or 9.0+PTX separated by ';' or ',' (default {DEFAULT_CUDA_ARCHS!r})")
        major, minor, suffix, ptx = match.groups()
        if minor is None:  # '80' -> 8.0, '90' -> 9.0, '100' -> 10.0
            if len(major) < 2:
                raise SetupError(f"{variable}={spec!r}: {item!r} is not an architecture; did you mean {item}.0?")
            major, minor = major[:-1], major[-1]
        arch = f"{int(major)}.{minor}{(suffix or '').lower()}{'+PTX' if ptx else ''}"
        if arch not in archs:
            archs.append(arch)
    if not archs:
        raise SetupError(f"{variable}={spec!r} names no architecture (default {DEFAULT_CUDA_ARCHS!r})")
    return archs


def arch_number(arch: str) -> int:
    """'9.0a+PTX' -> 90."""
    major, minor = re.match(r"(\d+)\.(\d)", arch).groups()
    return int(major) * 10 + int(minor)


def nvcc_known_archs(nvcc: str) -> set[int] | None:
    """The compute capabilities this nvcc can compile for (`nvcc --list-gpu-arch`), None if it cannot say."""
    try:
        listing = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    known = {int(number) for number in re.findall(r"compute_(\d+)", listing)}
    return known or None


def choose_archs(environ, known: set[int] | None) -> list[str]:
    """The architectures to build for, checked: FUSEDGPT_CUDA_ARCHS, else TORCH_CUDA_ARCH_LIST, else the default.

    An explicit FUSEDGPT_CUDA_ARCHS entry older than sm_80 is an error; in TORCH_CUDA_ARCH_LIST (which other
    packages share) such entries are left out with a note. An architecture nvcc does not know is an error."""
    for variable in ("FUSEDGPT_CUDA_ARCHS", "TORCH_CUDA_ARCH_LIST"):
        if environ.get(variable, "").strip():
            spec = environ[variable]
            break
    else:
        variable, spec = "the default architecture list", DEFAULT_CUDA_ARCHS
    archs = normalise_archs(spec, variable)
    too_old = [arch for arch in archs if arch_number(arch) < OLDEST_ARCH]
    if too_old and variable != "TORCH_CUDA_ARCH_LIST":
        raise SetupError(f"{variable}={spec!r}: {';'.join(too_old)} is older than sm_80, which the kernels need "
                         "(mma.sync on bf16); remove it, e.g. FUSEDGPT_CUDA_ARCHS='8.0;9.0+PTX'")
    if too_old:
        say(f"leaving out {';'.join(too_old)} from TORCH_CUDA_ARCH_LIST: the CUDA kernels need sm_80 or newer "
            "(set FUSEDGPT_CUDA_ARCHS to choose fusedgpt's architectures alone)")
        archs = [arch for arch in archs if arch not in too_old]
        if not archs:
            raise SetupError(f"TORCH_CUDA_ARCH_LIST={spec!r} has no architecture of sm_80 or newer; set "
                             "FUSEDGPT_CUDA_ARCHS, e.g. FUSEDGPT_CUDA_ARCHS='8.0;9.0+PTX'")
    if known:
        unknown = [arch for arch in archs if arch_number(arch) not in known]
        if unknown:
            raise SetupError(f"{variable}={spec!r}: this nvcc cannot compile for {';'.join(unknown)} (it knows "
                             f"{', '.join(str(number) for number in sorted(known))}); remove it or use another "
                             "CUDA toolkit (CUDA_HOME)")
    return archs


def arch_tag(archs: list[str]) -> str:
    """The architecture list as one preprocessor token, e.g. '80_90a_90ptx' for 8.0;9.0a;9.0+PTX.

    It reaches csrc/ops.cpp as -DFUSEDGPT_CUDA_ARCHS=<tag>, which `cuda_archs()` turns back into a
    comma-separated list; no comma or semicolon, which compilers' (and nvcc's) argument parsing split."""
    return "_".join(arch.replace(".", "").replace("+PTX", "ptx") for arch in archs)


# ----------------------------------------------------------------------------------------------------
# The CUDA toolkit
# ----------------------------------------------------------------------------------------------------

def toolkit_problem(home: str) -> str | None:
    """What a CUDA toolkit root lacks for building an extension (None if nothing)."""
    if not os.path.isfile(os.path.join(home, "bin", "nvcc")):
        return f"no bin/nvcc in {home}"
    headers = [os.path.join(home, "include", "cuda_runtime.h")] + glob.glob(
        os.path.join(home, "targets", "*", "include", "cuda_runtime.h"))
    if not any(os.path.isfile(path) for path in headers):
        return f"no include/cuda_runtime.h in {home}"
    if not any(glob.glob(os.path.join(home, lib, "libcudart.so*")) for lib in ("lib64", "lib")):
        return f"no lib64/libcudart.so in {home}"
    return None


def toolkit_of_nvcc(nvcc: str) -> str:
    """The toolkit root an nvcc runs from. nvcc's dry run prints its own bin folder (`_HERE_`), which also
    sees through a wrapper script outside the toolkit (torch would guess the wrapper's parent folder)."""
    try:
        dry_run = subprocess.run([nvcc, "-dryrun", "-c", "fusedgpt_probe.cu"], capture_output=True, text=True,
                                 timeout=60)
        here = re.search(r"^#\$ _HERE_=(.+)$", dry_run.stdout + dry_run.stderr, flags=re.MULTILINE)
    except (OSError, subprocess.SubprocessError):
        here = None
    bin_dir = here.group(1).strip() if here else os.path.dirname(os.path.realpath(nvcc))
    return os.path.dirname(os.path.abspath(bin_dir))


def find_cuda_home(environ, which=shutil.which) -> tuple[str | None, str]:
    """(toolkit root, '') or (None, why there is none). A CUDA_HOME / CUDA_PATH that is set but holds no
    usable toolkit raises SetupError; no nvcc anywhere means no extension, which is not an error."""
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        home = environ.get(variable, "").strip()
        if home:
            problem = toolkit_problem(home)
            if problem:
                raise SetupError(f"{variable}={home}: {problem}; point {variable} at a CUDA toolkit (the folder "
                                 f"with bin/nvcc), or unset it to use the nvcc on PATH; {HOW_TO_SKIP}")
            return os.path.abspath(home), ""
    nvcc = which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.isfile("/usr/local/cuda/bin/nvcc") else None)
    if nvcc is None:
        return None, "no nvcc found (set CUDA_HOME to a CUDA toolkit, or put its nvcc on PATH)"
    home = toolkit_of_nvcc(nvcc)
    problem = toolkit_problem(home)
    if problem:
        raise SetupError(f"the nvcc on PATH ({nvcc}) runs from {home}, but {problem}; set CUDA_HOME to the CUDA "
                         f"toolkit; {HOW_TO_SKIP}")
    return home, ""


# ----------------------------------------------------------------------------------------------------
# The extension
# ----------------------------------------------------------------------------------------------------

def cuda_extension_or_reason(environ=os.environ):
    """Returns (ext_modules, cmdclass) for the CUDA build, or (None, reason it is skipped)."""
    if environ.get(SKIP_VARIABLE, "0").strip() not in ("", "0"):
        return None, f"{SKIP_VARIABLE} is set"
    try:
        import torch
    except ImportError:
        return None, ("torch is not installed in the build environment (install torch first, then "
                      "pip install --no-build-isolation)")
    if torch.version.cuda is None:
        return None, (f"torch {torch.__version__} is a CPU-only build (install a CUDA build of torch for the "
                      "CUDA kernels)")
    home, reason = find_cuda_home(environ)
    if home is None:
        return None, reason
    os.environ["CUDA_HOME"] = home  # before cpp_extension is imported: it reads CUDA_HOME once
    from torch.utils import cpp_extension

    cpp_extension.CUDA_HOME = home
    nvcc = os.path.join(home, "bin", "nvcc")
    archs = choose_archs(environ, nvcc_known_archs(nvcc))
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs)  # torch turns this into -gencode flags
    say(f"building the CUDA extension fusedgpt._C for {';'.join(archs)} with {nvcc} (torch {torch.__version__}, "
        f"CUDA {torch.version.cuda}, MAX_JOBS={environ.get('MAX_JOBS', 'auto')}); this takes minutes "
        "(pip install -v shows each file)")

    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/*/*.cu", root_dir=ROOT))
    extension = cpp_extension.CUDAExtension(
        name="fusedgpt._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={
            # Only csrc/ops.cpp (the host compiler) reads the architecture list, as one token.
            "cxx": ["-O3", "-DFUSEDGPT_PYTHON_MODULE", f"-DFUSEDGPT_CUDA_ARCHS={arch_tag(archs)}"],
            "nvcc": NVCC_FLAGS,
        },
        py_limited_api=False,
    )
    base = cpp_extension.BuildExtension.with_options(use_ninja=True)

    class BuildExtension(base):
        """torch's BuildExtension, with a short account of a failed build at the end of the log."""

        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as error:
                first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
                say(f"the CUDA extension fusedgpt._C failed to build for {';'.join(archs)} with {nvcc}: {first_line}")
                say("the compiler's first error is above (lines starting 'FAILED:' name the file)")
                say(f"{HOW_TO_SKIP}, e.g. {SKIP_VARIABLE}=1 pip install --no-build-isolation -e '.[test]'")
                raise

    return [extension], {"build_ext": BuildExtension}


OLDEST_SETUPTOOLS = 77  # pyproject.toml's SPDX `license` and `license-files`; bdist_wheel built in


def check_setuptools(version: str) -> None:
    """An older setuptools fails later, on pyproject.toml's license field, with a page of schema text."""
    major = re.match(r"\d+", version)
    if major is None or int(major.group()) < OLDEST_SETUPTOOLS:
        raise SetupError(f"setuptools {version} is too old to build fusedgpt (needs >= {OLDEST_SETUPTOOLS}); "
                         f"pip install 'setuptools>={OLDEST_SETUPTOOLS}' and run the install again")


if __name__ == "__main__":
    import setuptools
    from setuptools import setup

    check_setuptools(setuptools.__version__)

    ext_modules, cmdclass_or_reason = cuda_extension_or_reason()
    if ext_modules is None:
        say(f"NOT building the CUDA extension: {cmdclass_or_reason}. "
            "Installing the Triton and PyTorch backends only; `fusedgpt info` will say so.")
        ext_modules, cmdclass = [], {}
    else:
        cmdclass = cmdclass_or_reason

    setup(
        packages=PACKAGES,
        package_dir={"fusedgpt": "python/fusedgpt", "fusedgpt.triton_kernels": "triton_kernels"},
        # The embedded model that `fusedgpt generate` uses by default (scripts/train_tiny.py makes it).
        package_data={"fusedgpt.data": ["tiny-sotu/*.json", "tiny-sotu/*.safetensors"]},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )
