"""Builds csrc/ for the CPU emulator (simt.h) and registers its ops as torch.ops.fusedgpt_simt.*.

The sources are copied to a build directory with two mechanical rewrites and compiled by the host C++
compiler, with simt.h force-included and include/ (stand-ins for the CUDA toolkit and c10/cuda headers)
searched first:
  kernel<<<grid, block, shared_bytes, stream>>>(args)
      ->  ::simt::Launch("kernel", grid, block, shared_bytes, stream)(kernel, args)
  TORCH_LIBRARY(fusedgpt, ...) / TORCH_LIBRARY_IMPL(fusedgpt, ...)  ->  the fusedgpt_simt namespace
so the emulated library can be loaded beside the real extension. Everything else, host checks and
parameter set-up included, is the code that runs on a GPU. The launch's first argument, the kernel
expression as the source writes it (e.g. "attention_fwd_kernel<Element, HEAD_DIM>"), names the kernel
in the memory counters.

Three builds (flavours), each in its own directory build/<flavour>/torch-<version>/; one process loads
one of them, since they register the same namespace:
  simt        the default.
  simt-asan   FUSEDGPT_SIMT_SANITIZE=1: built with AddressSanitizer; the process must then preload the
              sanitizer's runtime (see sanitizer_environment()), and every out-of-bounds access of a
              kernel, to a tensor or to shared memory, stops the run with a report.
  simt-count  FUSEDGPT_SIMT_COUNT=1: the memory counters (simt.h says what they model): per kernel, the
              shared-memory wavefronts of each warp request against the conflict-free ideal, and the
              global-memory sectors against the bytes requested, as Nsight Compute counts them.

The memory counters from Python, in a fresh process with the counting build (the one that called it may
have loaded the default build already):

    counters = simt_emulator.measure('''
    q = torch.randn(1, 64, 2, 64, dtype=torch.float16)
    ops.attention(q, q, q, True, None, 0.125, None)
    ''')                      # {kernel name: counters}; the code gets ops = torch.ops.fusedgpt_simt, torch
    simt_emulator.summarise(counters)["attention_fwd_kernel<Element, HEAD_DIM>"]
    # {"shared_conflict_ratio": 1.0 when conflict-free, "shared_wavefronts_per_request": ...,
    #  "global_sector_efficiency": 1.0 when every byte of every sector touched was asked for, ...}

Each kernel's counters also list its worst static instructions (pc_offset in the library file, with the
source line that addr2line names, when it is installed). count_launches(codes) runs many cases in one
process and returns, per case, a list with one entry per kernel, named by its compiled instantiation (what
bench/static_report.py joins with nvcc's resources). Inside a process that loads only the counting build,
counting_ops() returns the ops, and ops.memory_counters() (JSON text) / ops.memory_counters_reset() read
and clear the counters; every build has them (the others report "counting": false).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPOSITORY = HERE.parent.parent
CSRC = REPOSITORY / "csrc"
NAMESPACE = "fusedgpt_simt"

# `name<templates><<<launch>>>(` up to the kernel's first argument; launch arguments hold no `>>>`.
_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^;{}]*?>)?)\s*<<<(.*?)>>>\s*\(", re.S)
_LIBRARY = re.compile(r"\b(TORCH_LIBRARY(?:_IMPL)?)\(fusedgpt,")


def _launch(match: re.Match) -> str:
    kernel = match.group(1)
    name = json.dumps(" ".join(kernel.split()))  # a C string literal: the kernel's text, on one line
    return f"::simt::Launch({name}, {match.group(2)})({kernel}, "


def rewrite(source: str) -> str:
    source = _LAUNCH.sub(_launch, source)
    return _LIBRARY.sub(lambda m: f"{m.group(1)}({NAMESPACE},", source)


# ---- the three builds ----------------------------------------------------------------------------------

DEFAULT, SANITIZED, COUNTING = "simt", "simt-asan", "simt-count"

# ThreadSanitizer's instrumentation without its runtime: gcc calls __tsan_{read,write}<bytes>(address)
# before every access to memory that may be shared (any global or static, anything behind a pointer,
# locals whose address escapes), and memory_counters.cpp defines those callbacks. (AddressSanitizer's
# instrumentation would not do: it leaves out accesses at a constant offset into a static, which it can
# prove in bounds, e.g. a __shared__ array at a literal or unrolled index.) No function entry/exit hooks.
# The tree optimisations that would change access widths are off: scalar replacement splits a 16-byte
# uint4 copy into four 4-byte accesses, the vectorizers and store merging widen narrow ones.
# -g1: line tables, so that addr2line names each instruction's source line.
COUNTING_FLAGS = ["-DFUSEDGPT_SIMT_COUNT=1", "-fsanitize=thread", "--param=tsan-instrument-func-entry-exit=0",
                  "-fno-tree-sra", "-fno-tree-vectorize", "-fno-tree-slp-vectorize", "-fno-store-merging", "-g1"]
SANITIZER_FLAGS = ["-fsanitize=address", "-fno-omit-frame-pointer"]


def sanitized() -> bool:
    return os.environ.get("FUSEDGPT_SIMT_SANITIZE") == "1"


def counting() -> bool:
    return os.environ.get("FUSEDGPT_SIMT_COUNT") == "1"


def requested_flavour() -> str:
    """The build this process asks for through FUSEDGPT_SIMT_SANITIZE / FUSEDGPT_SIMT_COUNT."""
    if sanitized() and counting():
        raise ValueError("simt_emulator: FUSEDGPT_SIMT_SANITIZE=1 and FUSEDGPT_SIMT_COUNT=1 exclude each other "
                         "(both instrument every access); set one")
    return SANITIZED if sanitized() else COUNTING if counting() else DEFAULT


def sanitizer_environment() -> dict[str, str]:
    """The environment of a process that loads the AddressSanitizer build."""
    # libstdc++ loaded with the runtime, or AddressSanitizer cannot intercept __cxa_throw (Python itself
    # does not link it) and stops at the first C++ exception thrown by an extension.
    runtimes = [subprocess.run(["g++", f"-print-file-name={name}"], capture_output=True, text=True,
                               check=True).stdout.strip() for name in ("libasan.so", "libstdc++.so")]
    environment = {key: value for key, value in os.environ.items() if key != "FUSEDGPT_SIMT_COUNT"}
    return {**environment, "FUSEDGPT_SIMT_SANITIZE": "1", "LD_PRELOAD": " ".join(runtimes),
            # torch and Python are not instrumented: only the kernels' accesses are checked
            "ASAN_OPTIONS": "detect_leaks=0:alloc_dealloc_mismatch=0:detect_odr_violation=0"}


def counting_environment() -> dict[str, str]:
    """The environment of a process that loads the counting build (it needs no runtime)."""
    environment = {key: value for key, value in os.environ.items() if key != "FUSEDGPT_SIMT_SANITIZE"}
    return {**environment, "FUSEDGPT_SIMT_COUNT": "1"}


def build(build_dir: str | os.PathLike | None = None, verbose: bool = False, flavour: str | None = None) -> None:
    """Compiles (cached by torch's extension builder) and loads the emulated library once per process.

    flavour: DEFAULT, SANITIZED or COUNTING (by default, what the environment asks for). A process that
    has loaded one build cannot load another (they register the same ops): that is an error."""
    flavour = flavour or requested_flavour()
    if flavour not in (DEFAULT, SANITIZED, COUNTING):
        raise ValueError(f"simt_emulator: flavour must be one of {DEFAULT!r}, {SANITIZED!r}, {COUNTING!r}, "
                         f"got {flavour!r}")
    namespace = getattr(torch.ops, NAMESPACE)
    if hasattr(namespace, "attention"):
        loaded = json.loads(namespace.memory_counters())["flavour"] if hasattr(namespace, "memory_counters") \
            else DEFAULT
        if loaded != flavour:
            raise RuntimeError(f"simt_emulator: this process has loaded the {loaded!r} build and cannot load the "
                               f"{flavour!r} one (both register torch.ops.{NAMESPACE}); run it in a fresh process, "
                               "e.g. simt_emulator.measure(...) for the memory counters")
        return
    from torch.utils.cpp_extension import load

    # One build folder per torch version: two environments on one checkout (CI's second torch) keep theirs.
    default_dir = REPOSITORY / "build" / flavour / f"torch-{torch.__version__.split('+')[0]}"
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
    # Kernels that test the emulator itself, and the memory counters' report (in every build).
    sources += [str(HERE / name) for name in ("selftest.cpp", "memory_counters_selftest.cpp", "memory_counters.cpp")]
    (build_dir / "obj").mkdir(parents=True, exist_ok=True)
    _remove_stale_lock(build_dir / "obj" / "lock")
    # -fno-strict-aliasing: the kernels reinterpret 16-bit element arrays as 32/128-bit words, as CUDA
    # code does; the host compiler's type-based alias analysis would otherwise reorder those accesses.
    flags = ["-O2", "-fno-strict-aliasing", "-include", str(HERE / "simt.h"), "-Wno-unused-function"]
    flags += {DEFAULT: [], SANITIZED: SANITIZER_FLAGS, COUNTING: COUNTING_FLAGS}[flavour]
    load(name=flavour.replace("-", "_").replace("simt", "fusedgpt_simt"), sources=sources,
         build_directory=str(build_dir / "obj"), is_python_module=False,
         extra_include_paths=[str(HERE / "include"), str(sources_dir)], extra_cflags=flags,
         extra_ldflags=SANITIZER_FLAGS if flavour == SANITIZED else [], verbose=verbose)


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


def ops(flavour: str | None = None):
    build(flavour=flavour)
    return getattr(torch.ops, NAMESPACE)


def counting_ops():
    """The ops of the counting build, for a process that loads no other build (see measure())."""
    return ops(COUNTING)


# ---- the memory counters -------------------------------------------------------------------------------

_REPORT_MARKER = "simt_emulator memory counters: "


def measure(case_code: str, timeout: float = 1800) -> dict[str, dict]:
    """Runs `case_code` (Python, given `ops` = torch.ops.fusedgpt_simt of the counting build and `torch`)
    in a fresh process and returns the memory counters of the kernels it launched, {kernel name: counters}.

    The name is the launch's text in the source (e.g. "attention_fwd_kernel<Element, HEAD_DIM>"); should
    one text start several kernels (instantiations, block sizes), each is "<text> [<function>, <n> threads]".
    Counters: name, function (the compiled kernel, when addr2line is installed), entry_offset, threads (per
    block), launches, blocks; shared_{load,store}_{requests,wavefronts,ideal_wavefronts};
    global_{load,store}_{requests,sectors,requested_bytes}; worst_shared_instructions and
    worst_global_instructions (up to 8 each, the most excess wavefronts / unrequested sector bytes first:
    pc_offset in the library file, is_store, requests, then wavefronts and ideal_wavefronts or sectors
    and requested_bytes, and source: file:line, innermost first, then the lines it is inlined at)."""
    return _keyed_by_name(_run_counted([case_code], timeout)[0])


def _keyed_by_name(kernels: list[dict]) -> dict[str, dict]:
    repeated = Counter(kernel["name"] for kernel in kernels)
    return {kernel["name"] if repeated[kernel["name"]] == 1 else
            f"{kernel['name']} [{kernel.get('function') or kernel['entry_offset']}, {kernel['threads']} threads]":
            kernel for kernel in kernels}


def count_launches(codes: list[str], timeout: float = 3600) -> dict[str, list[dict]]:
    """Runs each code as measure() does, all in one fresh process (one build, counters cleared between
    codes), and returns {code: [one entry per kernel it launched]}: measure()'s counters plus `kernel`
    (the compiled kernel's demangled name, e.g. "void fusedgpt::attention::attention_fwd_kernel<__half,
    64>(fusedgpt::attention::Params)", or the launch's text without addr2line) and the totals over loads
    and stores: shared_requests, shared_wavefronts, shared_ideal_wavefronts, global_requests,
    global_sectors, global_bytes (requested)."""
    reports = _run_counted(list(codes), timeout)
    for kernels in reports:
        for kernel in kernels:
            kernel["kernel"] = kernel.get("function") or kernel["name"]
            for space, quantities in (("shared", ("requests", "wavefronts", "ideal_wavefronts")),
                                      ("global", ("requests", "sectors", "requested_bytes"))):
                for quantity in quantities:
                    total = kernel[f"{space}_load_{quantity}"] + kernel[f"{space}_store_{quantity}"]
                    kernel[f"{space}_{'bytes' if quantity == 'requested_bytes' else quantity}"] = total
    return dict(zip(codes, reports))


def _run_counted(codes: list[str], timeout: float) -> list[list[dict]]:
    """The counters of each code's kernels, from one process started with the counting build."""
    run = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--measure"], input=json.dumps(codes),
                         env=counting_environment(), cwd=REPOSITORY, capture_output=True, text=True, timeout=timeout)
    reports = [json.loads(line[len(_REPORT_MARKER):]) for line in run.stdout.splitlines()
               if line.startswith(_REPORT_MARKER)]
    if run.returncode != 0 or len(reports) != len(codes):
        raise RuntimeError(f"simt_emulator: a counted case failed (exit status {run.returncode}, {len(reports)} "
                           f"of {len(codes)} cases reported):\n{run.stdout[-3000:]}\n{run.stderr[-5000:]}")
    for report in reports:
        if not report["counting"]:
            raise RuntimeError(f"simt_emulator: the {report['flavour']!r} build was loaded, not the counting one")
        _name_sources(report["library"], report["kernels"])
    return [report["kernels"] for report in reports]


def _run_counted_here(codes: list[str]) -> None:
    """The process _run_counted() starts: loads the counting build, runs each code, prints its report."""
    emulated = counting_ops()
    for index, code in enumerate(codes):
        emulated.memory_counters_reset()
        namespace = {"ops": emulated, "torch": torch, "__name__": "__case__"}
        exec(compile(textwrap.dedent(code), f"<counted case {index}>", "exec"), namespace)
        print(_REPORT_MARKER + emulated.memory_counters(), flush=True)


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def summarise(counters: dict[str, dict]) -> dict[str, dict[str, float | int | None]]:
    """Per kernel, from measure()'s counters: the ratios Nsight Compute would show (None without requests).

    shared_wavefronts_per_request  wavefronts / requests (1.0 for conflict-free accesses of <= 4 bytes)
    shared_conflict_ratio          wavefronts / ideal wavefronts: 1.0 conflict-free, 8.0 for 8-way conflicts
    global_sector_efficiency       bytes requested / (32 * sectors touched), in (0, 1]: 1.0 fully coalesced
    with the request counts, and each of them for loads (shared_load_*, global_load_*) and stores too."""
    summary = {}
    for name, kernel in counters.items():
        entry: dict[str, float | int | None] = {}
        for prefix, directions in (("shared", ("load", "store")), ("shared_load", ("load",)),
                                   ("shared_store", ("store",))):
            requests, wavefronts, ideal = (sum(kernel[f"shared_{direction}_{quantity}"] for direction in directions)
                                           for quantity in ("requests", "wavefronts", "ideal_wavefronts"))
            entry[f"{prefix}_requests"] = requests
            entry[f"{prefix}_wavefronts_per_request"] = _ratio(wavefronts, requests)
            entry[f"{prefix}_conflict_ratio"] = _ratio(wavefronts, ideal)
        for prefix, directions in (("global", ("load", "store")), ("global_load", ("load",)),
                                   ("global_store", ("store",))):
            requests, sectors, requested = (sum(kernel[f"global_{direction}_{quantity}"] for direction in directions)
                                            for quantity in ("requests", "sectors", "requested_bytes"))
            entry[f"{prefix}_requests"] = requests
            entry[f"{prefix}_sectors_per_request"] = _ratio(sectors, requests)
            entry[f"{prefix}_sector_efficiency"] = _ratio(requested, 32 * sectors)
        summary[name] = entry
    return summary


def _name_sources(library: str, kernels: list[dict]) -> None:
    """Adds `source` to each worst instruction and `function` to each kernel, read by addr2line from the
    library's line tables (-g1); without addr2line the counters stay as they are."""
    addr2line = shutil.which("addr2line")
    if addr2line is None or not library:
        return
    instructions = [instruction for kernel in kernels
                    for instruction in kernel["worst_shared_instructions"] + kernel["worst_global_instructions"]]
    offsets = {instruction["pc_offset"] for instruction in instructions}
    offsets.update(kernel["entry_offset"] for kernel in kernels if kernel["entry_offset"] is not None)
    if not offsets:
        return
    run = subprocess.run([addr2line, "-a", "-f", "-C", "-i", "-e", library, *sorted(offsets)], capture_output=True,
                         text=True)
    if run.returncode != 0:
        return
    # Each address line is followed by pairs of lines, function then /path/file:line, innermost first
    # (-i: then the functions it is inlined in, with the lines it is inlined at).
    frames: dict[int, list[tuple[str, str]]] = {}
    address, function = None, None
    for line in run.stdout.splitlines():
        if line.startswith("0x"):
            address, function = int(line, 16), None
            frames[address] = []
        elif address is None:
            continue
        elif function is None:
            function = line
        else:
            frames[address].append((function, _source_location(line)))
            function = None
    for instruction in instructions:
        chain = frames.get(int(instruction["pc_offset"], 16), [])
        instruction["source"] = " <- ".join(location for _, location in chain) or None
    for kernel in kernels:
        if kernel["entry_offset"] is not None:
            chain = frames.get(int(kernel["entry_offset"], 16), [])
            kernel["function"] = chain[-1][0] if chain else None


def _source_location(location: str) -> str:
    """addr2line's /path/file:line as a path in the repository: the copies in the build folder name csrc/."""
    location = re.sub(r"\s*\(discriminator \d+\)$", "", location)
    path, _, line = location.rpartition(":")
    match = re.search(r"/build/[^/]+/[^/]+/src/(.*)$", path)
    if match:
        path = "csrc/" + re.sub(r"\.cu\.cpp$", ".cu", match.group(1))
    elif path.startswith(str(REPOSITORY) + "/"):
        path = path[len(str(REPOSITORY)) + 1:]
    return f"{path}:{line}"


if __name__ == "__main__":
    if sys.argv[1:] == ["--measure"]:  # the process measure() starts: a JSON list of codes on stdin
        _run_counted_here(json.loads(sys.stdin.read()))
    else:
        shutil.rmtree(REPOSITORY / "build" / requested_flavour(), ignore_errors=True)
        build(verbose=True)
        print("built:", [name for name in ("layer_norm", "add_layer_norm", "bias_act", "kv_append", "attention",
                                           "decode_attention") if hasattr(ops(), name)])
