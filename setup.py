"""Build script for fusedgpt: the Python package plus the optional CUDA extension `fusedgpt._C`.

    pip install --no-build-isolation .        # or -e . for an editable install

The extension is compiled against the torch already installed (hence --no-build-isolation) for the
architectures in FUSEDGPT_CUDA_ARCHS (else TORCH_CUDA_ARCH_LIST, else 8.0;8.6;8.9;9.0+PTX). MAX_JOBS
caps the parallel nvcc jobs. With FUSEDGPT_SKIP_CUDA_BUILD=1, without nvcc, or with a CPU-only torch the
package installs its Triton and PyTorch paths only, and says so here and in `fusedgpt info`.
"""

import glob
import os
import re
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0+PTX"


def _say(message: str) -> None:
    print(f"fusedgpt setup: {message}", file=sys.stderr, flush=True)


def _normalise_archs(spec: str) -> list[str]:
    """'80, sm_86 9.0+PTX' -> ['8.0', '8.6', '9.0+PTX'] (torch's TORCH_CUDA_ARCH_LIST spelling)."""
    archs = []
    for item in re.split(r"[;,\s]+", spec.strip()):
        if not item:
            continue
        match = re.fullmatch(r"(?:sm_|compute_)?(\d+)\.?(\d)?(a)?(\+ptx)?", item, flags=re.IGNORECASE)
        if match is None:
            raise SystemExit(f"fusedgpt setup: cannot read CUDA architecture {item!r} in {spec!r}; "
                             "expected forms like 8.0, 80, sm_90 or 9.0+PTX")
        major, minor, suffix_a, ptx = match.groups()
        if minor is None:  # '80' -> 8.0, '90' -> 9.0, '100' -> 10.0
            major, minor = major[:-1], major[-1]
        archs.append(f"{major}.{minor}{suffix_a or ''}{'+PTX' if ptx else ''}")
    if not archs:
        raise SystemExit(f"fusedgpt setup: no CUDA architecture in {spec!r}")
    return archs


def _cuda_extension_or_reason():
    """Returns (ext_modules, cmdclass) for the CUDA build, or (None, reason it is skipped)."""
    if os.environ.get("FUSEDGPT_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        return None, "FUSEDGPT_SKIP_CUDA_BUILD is set"
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return None, "torch is not installed in the build environment (use --no-build-isolation)"
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is a CPU-only build"
    if cpp_extension.CUDA_HOME is None:
        return None, "nvcc was not found (set CUDA_HOME or put nvcc on PATH)"

    spec = os.environ.get("FUSEDGPT_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_CUDA_ARCHS
    archs = _normalise_archs(spec)
    too_old = [arch for arch in archs if int(arch.split(".")[0]) < 8]
    if too_old:  # the kernels use sm_80 instructions (mma.sync m16n8k16 on fp16 and bf16)
        _say(f"leaving out {';'.join(too_old)}: the CUDA kernels need sm_80 or newer")
        archs = [arch for arch in archs if arch not in too_old]
        if not archs:
            return None, f"no architecture of sm_80 or newer in {spec!r}"
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs)  # torch turns this into -gencode flags
    # Recorded in the library so `fusedgpt info` can say what this build runs on.
    arch_tag = ",".join(a.replace(".", "").replace("+PTX", "_ptx").lower() for a in archs)
    _say(f"building the CUDA extension fusedgpt._C for {';'.join(archs)} "
         f"(torch {torch.__version__}, CUDA {torch.version.cuda}, MAX_JOBS={os.environ.get('MAX_JOBS', 'auto')})")

    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/*/*.cu", root_dir=ROOT))
    defines = ["-DFUSEDGPT_PYTHON_MODULE", f"-DFUSEDGPT_CUDA_ARCHS={arch_tag}"]
    extension = cpp_extension.CUDAExtension(
        name="fusedgpt._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={
            "cxx": ["-O3"] + defines,
            "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr"] + defines,
        },
        py_limited_api=False,
    )
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [extension], {"build_ext": build_ext}


ext_modules, cmdclass_or_reason = _cuda_extension_or_reason()
if ext_modules is None:
    _say(f"NOT building the CUDA extension: {cmdclass_or_reason}. "
         "Installing the Triton and PyTorch backends only; `fusedgpt info` will say so.")
    ext_modules, cmdclass = [], {}
else:
    cmdclass = cmdclass_or_reason

setup(
    packages=["fusedgpt", "fusedgpt.ops", "fusedgpt.nn", "fusedgpt.models", "fusedgpt.triton_kernels", "fusedgpt.data"],
    package_dir={"fusedgpt": "python/fusedgpt", "fusedgpt.triton_kernels": "triton_kernels"},
    # The embedded model that `fusedgpt generate` uses by default (scripts/train_tiny.py makes it).
    package_data={"fusedgpt.data": ["tiny-sotu/*.json", "tiny-sotu/*.safetensors"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
