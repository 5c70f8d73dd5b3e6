"""The SIMT emulator's memory counters (tests/simt/memory_counters.cpp, model in simt.h), against counts
worked out by hand: kernels written to conflict and not to conflict in shared memory, to coalesce and not
in global memory (tests/simt/memory_counters_selftest.cpp), the emulator's own shuffles, mma, barriers and
threadIdx reads (which must cost the kernel nothing), and the real prefill attention kernel. The counting
build cannot share a process with the default one (both register torch.ops.fusedgpt_simt): every counted
kernel runs in one fresh process (simt_emulator.measure), and the tests read its report."""

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "simt"))
import simt_emulator  # noqa: E402

QUANTITIES = {"shared_load": ("requests", "wavefronts", "ideal_wavefronts"),
              "shared_store": ("requests", "wavefronts", "ideal_wavefronts"),
              "global_load": ("requests", "sectors", "requested_bytes"),
              "global_store": ("requests", "sectors", "requested_bytes")}


def _counts(shared_load=(0, 0, 0), shared_store=(0, 0, 0), global_load=(0, 0, 0), global_store=(1, 4, 128)):
    """The twelve totals of a kernel; by default only each pattern's final coalesced float store of one warp
    (32 lanes x 4 bytes: 1 request, 4 sectors, 128 bytes)."""
    given = {"shared_load": shared_load, "shared_store": shared_store, "global_load": global_load,
             "global_store": global_store}
    return {f"{space}_{quantity}": value for space, quantities in QUANTITIES.items()
            for quantity, value in zip(quantities, given[space])}


# pattern: (threads, expected totals). Shared: (requests, wavefronts, ideal wavefronts); global: (requests,
# sectors, bytes requested). 32 banks of 4 bytes; one phase for <= 4-byte accesses, 2 for 8, 4 for 16.
PATTERNS = {
    "shared_load_consecutive": (32, _counts(shared_load=(1, 1, 1))),
    # 2 warps, the second of 16 lanes: 2 words per bank in the first, 16 distinct banks in the second
    "shared_load_stride2": (48, _counts(shared_load=(2, 2 + 1, 2), global_store=(2, 4 + 2, 128 + 64))),
    "shared_load_stride32": (64, _counts(shared_load=(2, 2 * 32, 2), global_store=(2, 8, 256))),  # 32-way
    "shared_load_broadcast": (32, _counts(shared_load=(1, 1, 1))),  # one word read by every lane
    # 4 executions of one static instruction by each lane: 4 requests, stride 32 floats: 32-way each
    "shared_load_transposed": (32, _counts(shared_load=(4, 4 * 32, 4))),
    "shared_load_transposed_padded": (32, _counts(shared_load=(4, 4, 4))),  # stride 33: conflict-free
    "shared_load_vector16": (32, _counts(shared_load=(1, 4, 4))),  # 4 phases of 8 lanes x 16 bytes
    "shared_load_vector16_stride2": (32, _counts(shared_load=(1, 8, 4))),  # lanes l and l + 4 share banks
    "shared_load_vector16_quarter": (32, _counts(shared_load=(1, 1, 1))),  # lanes 0-7: one active phase
    "shared_load_vector8": (32, _counts(shared_load=(1, 2, 2))),  # 2 phases of 16 lanes x 8 bytes
    "shared_load_vector8_stride2": (32, _counts(shared_load=(1, 4, 2))),  # lanes l and l + 8 share banks
    "shared_load_half": (32, _counts(shared_load=(1, 1, 1))),  # 2-byte reads: 16 words
    "shared_load_half_stride64": (32, _counts(shared_load=(1, 32, 1))),  # 128-byte stride: all in bank 0
    # a 2-way store, then tile[lane]; x[0] (every lane: 1 sector, 4 bytes) is the value stored
    "shared_store_stride2": (32, _counts(shared_store=(1, 2, 1), shared_load=(1, 1, 1), global_load=(1, 1, 4))),
    # the prefill attention's transposed V store at head dim 64: keys r = lane / 8 of 2 words, 8 dims
    # c = (lane % 8) * 8 whose rows of 72 halves = 36 words all fall in the same banks: 8-way
    "shared_store_transposed_half": (32, _counts(shared_store=(1, 8, 1), shared_load=(1, 1, 1),
                                                 global_load=(1, 1, 4))),
    "global_load_coalesced": (32, _counts(global_load=(1, 4, 128))),
    "global_load_stride2": (32, _counts(global_load=(1, 8, 128))),  # efficiency 0.5
    "global_load_misaligned": (32, _counts(global_load=(1, 5, 128))),  # bytes 4-131: sectors 0-4
    "global_load_vector16": (32, _counts(global_load=(1, 16, 512))),
    "global_load_broadcast": (32, _counts(global_load=(1, 1, 4))),
}

# The emulator's own work is not the kernel's. selftest_shuffle, 96 threads (3 warps), shuffles, a barrier,
# threadIdx / blockDim reads: x[threadIdx.x] loads and out[threadIdx.x] stores (3 requests of 4 sectors
# each), lane 0 of each warp stores partial[warp] (3 requests), every lane reads partial[0..2] (3 broadcast
# requests per warp). selftest_mma, one warp, fp16: 6 fragment loads of 4 bytes per lane from 8 rows of 32
# bytes (8 sectors, 128 bytes each), 4 float stores to 8 rows of 32 bytes. Nothing else.
EMULATOR_KERNELS = {
    "shuffle_kernel": _counts(shared_load=(9, 9, 9), shared_store=(3, 3, 3), global_load=(3, 12, 384),
                              global_store=(3, 12, 384)),
    "mma_kernel<__half>": _counts(global_load=(6, 48, 768), global_store=(4, 32, 512)),
    # selftest_cp_async, mode 0, 64 threads (2 warps): thread t copies chunks 2t and 2t + 1 (16 bytes
    # each; 32-byte stride per request: half of every sector, and 2-way bank conflicts where they land),
    # then reads chunks t and t + 64 of the buffer back (consecutive: conflict-free) and stores them.
    "cp_async_kernel": _counts(shared_load=(4, 16, 16), shared_store=(4, 32, 16), global_load=(4, 128, 2048),
                               global_store=(4, 64, 2048)),
}

# ldmatrix.x4 is one shared-memory request of 4 phases (one per 8x8 matrix): rows 8i .. 8i + 7 of a
# contiguous tile are 128 bytes in distinct banks (4 wavefronts, the ideal); rows 0, 8, 16, 24, 1, 9, ...
# in one phase put 4 rows on the same 4 banks (4-way: 16 wavefronts).
LDMATRIX_ORDERS = {"ldmatrix_kernel<false>": (list(range(32)), 4),
                   "ldmatrix_kernel<true>": ([8 * (i % 4) + i // 4 for i in range(32)], 16)}

ATTENTION = "attention_fwd_kernel<Element, HEAD_DIM>"

CASE = f"""
for pattern, threads in {[(name, threads) for name, (threads, _) in PATTERNS.items()]!r}:
    ops.selftest_memory_pattern(pattern, threads)
ops.selftest_shuffle(torch.randn(96), 5)
ops.selftest_mma(torch.randn(16, 16).half(), torch.randn(8, 16).half())
ops.selftest_cp_async(torch.randint(0, 255, (64 * 32,), dtype=torch.uint8), 0, 64 * 32, False)
rows = torch.randint(-100, 100, (32, 8), dtype=torch.int16)
for transpose, (order, _) in zip((False, True), {list(LDMATRIX_ORDERS.values())!r}):
    ops.selftest_ldmatrix(rows, torch.tensor(order, dtype=torch.int32), transpose)
q, k, v = torch.randn(1, 98, 1, 64, dtype=torch.float16), *(torch.randn(1, 128, 1, 64).half() for _ in range(2))
ops.attention(q, k, v, True, None, 0.125, None)
"""


@pytest.fixture(scope="module")
def counted():
    return simt_emulator.measure(CASE)  # builds the counting flavour once (cached under build/simt-count)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_selftest_patterns_count_as_worked_out(counted, pattern):
    threads, expected = PATTERNS[pattern]
    kernel = counted[pattern]
    assert (kernel["launches"], kernel["blocks"]) == (1, 1)
    assert {name: kernel[name] for name in expected} == expected


@pytest.mark.parametrize("name", EMULATOR_KERNELS)
def test_the_emulators_collectives_and_builtins_are_not_counted(counted, name):
    kernel = counted[name]
    assert {quantity: kernel[quantity] for quantity in EMULATOR_KERNELS[name]} == EMULATOR_KERNELS[name]


def test_only_the_launched_kernels_are_reported(counted):
    assert set(counted) == set(PATTERNS) | set(EMULATOR_KERNELS) | set(LDMATRIX_ORDERS) | {ATTENTION}


def test_summary_ratios(counted):
    summary = simt_emulator.summarise(counted)
    assert summary["shared_load_stride32"]["shared_conflict_ratio"] == 32.0
    assert summary["shared_load_vector16"]["shared_wavefronts_per_request"] == 4.0
    assert summary["shared_load_vector16"]["shared_conflict_ratio"] == 1.0
    assert summary["global_load_stride2"]["global_load_sector_efficiency"] == 0.5
    assert summary["global_load_misaligned"]["global_load_sector_efficiency"] == 128 / 160
    assert summary["global_load_coalesced"]["global_sector_efficiency"] == 1.0
    assert summary["global_load_coalesced"]["shared_conflict_ratio"] is None  # no shared request
    assert summary["shared_store_stride2"]["shared_store_conflict_ratio"] == 2.0


def test_worst_instructions_name_their_source(counted):
    worst = counted["shared_load_stride32"]["worst_shared_instructions"]
    assert len(worst) == 1 and worst[0]["is_store"] is False
    assert (worst[0]["requests"], worst[0]["wavefronts"], worst[0]["ideal_wavefronts"]) == (2, 64, 2)
    assert counted["shared_load_consecutive"]["worst_shared_instructions"] == []  # nothing wasted
    if "source" in worst[0]:  # addr2line installed
        assert worst[0]["source"].startswith("tests/simt/memory_counters_selftest.cpp:")
        assert "memory_pattern_kernel" in counted["shared_load_stride32"]["function"]


@pytest.mark.parametrize("name", LDMATRIX_ORDERS)
def test_ldmatrix_is_one_request_of_four_phases(counted, name):
    kernel = counted[name]
    ldmatrix = [i for i in kernel["worst_shared_instructions"] if not i["is_store"]]
    wavefronts = LDMATRIX_ORDERS[name][1]
    assert (kernel["shared_load_requests"], kernel["shared_load_wavefronts"],
            kernel["shared_load_ideal_wavefronts"]) == (1, wavefronts, 4)
    assert len(ldmatrix) == (wavefronts > 4)  # only a conflicted request is listed as wasteful


def test_the_prefill_attention_kernel_is_counted(counted):
    """One block of the real kernel (98 queries, so 30 rows of its Q tile are zero-filled copies that
    read nothing, 128 keys, head dim 64, fp16): its ldmatrix reads of the padded Q, K and V tiles, the
    landing of its cp.async copies and the output's staging are conflict-free, as attention_kernel.cuh
    lays the tiles out to be, and its global loads (cp.async) and stores are whole 16-byte vectors of
    whole rows: every sector fully used (also after the zero fills: the lanes' copies stay grouped)."""
    kernel = counted[ATTENTION]
    assert (kernel["launches"], kernel["blocks"]) == (1, 1)
    assert kernel["shared_load_requests"] > 0 and kernel["shared_store_requests"] > 0
    assert kernel["shared_load_wavefronts"] == kernel["shared_load_ideal_wavefronts"]
    assert kernel["shared_store_wavefronts"] == kernel["shared_store_ideal_wavefronts"]
    assert kernel["global_load_requests"] > 0 and kernel["global_store_requests"] > 0
    assert kernel["global_load_sectors"] * 32 == kernel["global_load_requested_bytes"]
    assert kernel["global_store_sectors"] * 32 == kernel["global_store_requested_bytes"]
    assert kernel["worst_shared_instructions"] == [] and kernel["worst_global_instructions"] == []
    if "function" in kernel:
        assert "attention_fwd_kernel<__half, 64>" in kernel["function"]


def test_count_launches_clears_the_counters_between_cases_and_names_each_instantiation():
    """bench/static_report.py's entry point: one process for many cases, one entry per kernel and block
    size, named by the compiled kernel; the totals add loads and stores."""
    two_block_sizes = "ops.selftest_memory_pattern('shared_load_stride2', 32)\n" \
                      "ops.selftest_memory_pattern('shared_load_stride2', 64)"
    strided = "ops.selftest_memory_pattern('global_load_stride2', 32)"
    launches = simt_emulator.count_launches([two_block_sizes, strided])
    first = sorted(launches[two_block_sizes], key=lambda launch: launch["threads"])
    assert [(launch["threads"], launch["launches"]) for launch in first] == [(32, 1), (64, 1)]
    assert [(launch["shared_requests"], launch["shared_wavefronts"], launch["shared_ideal_wavefronts"])
            for launch in first] == [(1, 2, 1), (2, 4, 2)]
    (second,) = launches[strided]
    assert (second["shared_requests"], second["global_requests"], second["global_sectors"], second["global_bytes"]) \
        == (0, 2, 8 + 4, 128 + 128)
    if shutil.which("addr2line"):
        assert all("memory_pattern_kernel(int, float const*, float*, int)" in launch["kernel"]
                   for launch in first + [second])


# ---- without a process of its own ------------------------------------------------------------------------

def test_kernels_that_share_a_launch_text_are_told_apart():
    kernels = [{"name": "kernel", "function": "k<1>()", "entry_offset": "0x10", "threads": 128},
               {"name": "kernel", "function": None, "entry_offset": "0x20", "threads": 64},
               {"name": "other", "function": "o()", "entry_offset": "0x30", "threads": 32}]
    assert list(simt_emulator._keyed_by_name(kernels)) == ["kernel [k<1>(), 128 threads]",
                                                          "kernel [0x20, 64 threads]", "other"]


def test_the_launch_rewrite_names_the_kernel():
    source = "attention_fwd_kernel<Element, HEAD_DIM><<<grid, kThreads, 0, stream>>>(params);"
    assert simt_emulator.rewrite(source) == ('::simt::Launch("attention_fwd_kernel<Element, HEAD_DIM>", grid, '
                                             'kThreads, 0, stream)(attention_fwd_kernel<Element, HEAD_DIM>, params);')


def test_summarise_divides_the_totals():
    kernel = _counts(shared_load=(4, 32, 8), shared_store=(2, 2, 2), global_load=(3, 24, 384),
                     global_store=(0, 0, 0))
    summary = simt_emulator.summarise({"k": kernel})["k"]
    assert summary["shared_requests"] == 6 and summary["shared_wavefronts_per_request"] == 34 / 6
    assert summary["shared_conflict_ratio"] == 34 / 10 and summary["shared_load_conflict_ratio"] == 4.0
    assert summary["global_sector_efficiency"] == 0.5 and summary["global_load_sectors_per_request"] == 8.0
    assert summary["global_store_sector_efficiency"] is None and summary["global_store_requests"] == 0


def test_the_default_build_counts_nothing_and_refuses_the_counting_one():
    import json

    emulated = simt_emulator.ops()
    emulated.selftest_memory_pattern("shared_load_stride2", 32)
    report = json.loads(emulated.memory_counters())
    assert (report["flavour"], report["counting"], report["kernels"]) == ("simt", False, [])
    with pytest.raises(RuntimeError, match="has loaded the 'simt' build and cannot load the 'simt-count' one"):
        simt_emulator.counting_ops()


def test_sanitizing_and_counting_exclude_each_other(monkeypatch):
    monkeypatch.setenv("FUSEDGPT_SIMT_SANITIZE", "1")
    monkeypatch.setenv("FUSEDGPT_SIMT_COUNT", "1")
    with pytest.raises(ValueError, match="exclude each other"):
        simt_emulator.requested_flavour()
