// Stand-in for the CUDA toolkit header under the CPU emulator: everything it would provide comes from
// tests/simt/simt.h, which the emulator build force-includes.
#pragma once
