"""The kernel sources carry no emulator branches (issue 14, item 6): csrc/intrinsics.h is the one file of
csrc/ that knows about the SIMT emulator (tests/simt/simt.h) and the one that holds inline PTX, each
intrinsic behind a wrapper whose emulator twin is defined in simt.h and exercised by a selftest kernel
in tests/simt/selftest.cpp."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
SIMT = ROOT / "tests" / "simt"
SHIM = "intrinsics.h"  # relative to csrc/

EMULATOR_MENTION = re.compile(r"FUSEDGPT_SIMT|simt::")
INLINE_ASM = re.compile(r"\b(?:asm|__asm__)\s*(?:volatile\s*|__volatile__\s*)?\(")
TWIN_CALL = re.compile(r"::simt::(\w+)")


def csrc_files() -> dict[str, str]:
    """Every source of csrc/ (C++, CUDA and the generator), by path relative to csrc/."""
    return {path.relative_to(CSRC).as_posix(): path.read_text() for path in sorted(CSRC.rglob("*"))
            if path.suffix in (".cu", ".cuh", ".h", ".cpp", ".py") and "__pycache__" not in path.parts}


def violations(files: dict[str, str]) -> list[str]:
    """'path:line: what' for each emulator mention or inline asm outside the shim."""
    found = []
    for name, text in files.items():
        if name == SHIM:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if EMULATOR_MENTION.search(line):
                found.append(f"{name}:{number}: mentions the emulator: {line.strip()}")
            if INLINE_ASM.search(line):
                found.append(f"{name}:{number}: inline asm outside {SHIM}: {line.strip()}")
    return found


def test_only_the_shim_knows_the_emulator_or_holds_inline_asm():
    files = csrc_files()
    assert SHIM in files and "attention/attention_kernel.cuh" in files
    assert violations(files) == [], (f"move the intrinsic behind a wrapper in csrc/{SHIM} (its twin in "
                                     "tests/simt/simt.h): see that header's rule")


def test_the_check_finds_an_emulator_branch_and_inline_asm():
    """The scan above is not vacuous: the old kernel's #ifdef branch, a ::simt:: call and an asm
    statement are each reported, in any file but the shim."""
    kernel = ("__device__ void mma(float (&c)[4]) {\n#ifdef FUSEDGPT_SIMT_EMULATION\n"
              "  ::simt::mma_m16n8k16<__half>(c, a, b);\n#else\n  asm volatile(\"mma.sync...\");\n#endif\n}\n")
    assert violations({"attention/attention_kernel.cuh": kernel}) == [
        "attention/attention_kernel.cuh:2: mentions the emulator: #ifdef FUSEDGPT_SIMT_EMULATION",
        "attention/attention_kernel.cuh:3: mentions the emulator: ::simt::mma_m16n8k16<__half>(c, a, b);",
        "attention/attention_kernel.cuh:5: inline asm outside intrinsics.h: asm volatile(\"mma.sync...\");"]
    assert violations({"common.h": "  __asm__ __volatile__(\"bar.sync 0;\");"}) != []
    assert violations({SHIM: kernel}) == []


def test_every_wrapper_has_its_emulator_twin_and_a_selftest():
    shim = (CSRC / SHIM).read_text()
    simt = (SIMT / "simt.h").read_text()
    selftest = (SIMT / "selftest.cpp").read_text()
    twins = set(TWIN_CALL.findall(shim))
    assert "mma_m16n8k16" in twins  # the wrapper the attention kernel calls
    assert len(INLINE_ASM.findall(shim)) >= 1
    for twin in sorted(twins):
        assert re.search(rf"[\w*&]+\s+{twin}\s*\(", simt), f"no {twin} in tests/simt/simt.h"
        assert re.search(rf"::simt::{twin}\b", selftest), f"no selftest in tests/simt/selftest.cpp calls {twin}"
