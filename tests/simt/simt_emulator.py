"""Builds csrc/ for the CPU emulator (simt.h) and registers its ops as torch.ops.fusedgpt_simt.*.

The sources are copied to a build directory with two mechanical rewrites and compiled by the host C++
compiler, with simt.h force-included and include/ (stand-ins for the CUDA toolkit and c10/cuda headers)
searched first:
  kernel<<<grid, block, shared_bytes, stream>>>(args)  ->  ::simt::Launch(grid, block, shared_bytes, stream)(kernel, args)
  TORCH_LIBRARY(fusedgpt, ...) / TORCH_LIBRARY_IMPL(fusedgpt, ...)  ->  the fusedgpt_simt namespace
so the emulated library can be loaded beside the real extension. Everything else, host checks and
parameter set-up included, is the code that runs on a GPU.

With FUSEDGPT_SIMT_SANITIZE=1 the library is built with AddressSanitizer (in its own directory); the
process must then preload the sanitizer's runtime (see sanitizer_environment()), and every out-of-bounds
access of a kernel, to a tensor or to shared memory, stops the run with a report.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CSRC = HERE.parent.parent / "csrc"
NAMESPACE = "fusedgpt_simt"

# `name<templates><<<launch>>>(` up to the kernel's first argument; launch arguments hold no `>>>`.
_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^;{}]*?>)?)\s*<<<(.*?)>>>\s*\(", re.S)
_LIBRARY = re.compile(r"\b(TORCH_LIBRARY(?:_IMPL)?)\(fusedgpt,")


def rewrite(source: str) -> str:
    source = _LAUNCH.sub(lambda m: f"::simt::Launch({m.group(2)})({m.group(1)}, ", source)
    return _LIBRARY.sub(lambda m: f"{m.group(1)}({NAMESPACE},", source)


def sanitized() -> bool:
    return os.environ.get("FUSEDGPT_SIMT_SANITIZE") == "1"


def sanitizer_environment() -> dict[str, str]:
    """The environment of a process that loads the AddressSanitizer build."""
    # libstdc++ loaded with the runtime, or AddressSanitizer cannot intercept __cxa_throw (Python itself
    # does not link it) and stops at the first C++ exception thrown by an extension.
    runtimes = [subprocess.run(["g++", f"-print-file-name={name}"], capture_output=True, text=True,
                               check=True).stdout.strip() for name in ("libasan.so", "libstdc++.so")]
    return {**os.environ, "FUSEDGPT_SIMT_SANITIZE": "1", "LD_PRELOAD": " ".join(runtimes),
            # torch and Python are not instrumented: only the kernels' accesses are checked
            "ASAN_OPTIONS": "detect_leaks=0:alloc_dealloc_mismatch=0:detect_odr_violation=0"}


def build(build_dir: str | os.PathLike | None = None, verbose: bool = False) -> None:
    """Compiles (cached by torch's extension builder) and loads the emulated library once per process."""
    if hasattr(getattr(torch.ops, NAMESPACE), "attention"):
        return
    from torch.utils.cpp_extension import load

    name = "simt-asan" if sanitized() else "simt"
    # One build folder per torch version: two environments on one checkout (CI's second torch) keep theirs.
    default_dir = HERE.parent.parent / "build" / name / f"torch-{torch.__version__.split('+')[0]}"
    build_dir = Path(build_dir or os.environ.get("FUSEDGPT_SIMT_BUILD", default_dir))
    sources_dir = build_dir / "src"
    sources = []
    for path in sorted(CSRC.rglob("*")):
        if path.suffix not in (".cu", ".cuh", ".h", ".cpp"):
            continue
        target = sources_dir / path.relative_to(CSRC)
        if path.suffix == ".cu":
            target = target.with_suffix(".cu.cpp")  # compiled as C++ by the host compiler
        target.parent.mkdir(parents=True, exist_ok=True)
        text = rewrite(path.read_text())
        if not target.exists() or target.read_text() != text:  # keep timestamps: the build is cached
            target.write_text(text)
        if target.suffix == ".cpp":
            sources.append(str(target))
    sources.append(str(HERE / "selftest.cpp"))  # kernels that test the emulator itself
    (build_dir / "obj").mkdir(parents=True, exist_ok=True)
    _remove_stale_lock(build_dir / "obj" / "lock")
    # -fno-strict-aliasing: the kernels reinterpret 16-bit element arrays as 32/128-bit words, as CUDA
    # code does; the host compiler's type-based alias analysis would otherwise reorder those accesses.
    flags = ["-O2", "-fno-strict-aliasing", "-include", str(HERE / "simt.h"), "-Wno-unused-function"]
    sanitizer = ["-fsanitize=address", "-fno-omit-frame-pointer"] if sanitized() else []
    load(name=name.replace("-", "_").replace("simt", "fusedgpt_simt"), sources=sources,
         build_directory=str(build_dir / "obj"), is_python_module=False,
         extra_include_paths=[str(HERE / "include"), str(sources_dir)], extra_cflags=flags + sanitizer,
         extra_ldflags=sanitizer, verbose=verbose)


STALE_LOCK_SECONDS = 900  # a build takes 1-2 minutes on 2 cores


def _remove_stale_lock(lock: Path) -> None:
    """torch's extension builder waits, forever, for a lock file that a build interrupted by Ctrl-C or a
    timeout leaves behind: one far older than any build is removed (with a note) so the next run builds."""
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_SECONDS:
        print(f"simt_emulator: removing {lock}, left {age / 60:.0f} minutes ago by an interrupted build", flush=True)
        lock.unlink(missing_ok=True)


def ops():
    build()
    return getattr(torch.ops, NAMESPACE)


if __name__ == "__main__":
    shutil.rmtree(HERE.parent.parent / "build" / ("simt-asan" if sanitized() else "simt"), ignore_errors=True)
    build(verbose=True)
    print("built:", [name for name in ("layer_norm", "add_layer_norm", "bias_act", "kv_append", "attention",
                                       "decode_attention") if hasattr(ops(), name)])
