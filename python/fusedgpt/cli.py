"""The `fusedgpt` command line. `fusedgpt info`: versions, the GPU, the extension's build and the
backend each op will use on this machine."""

from __future__ import annotations

import argparse
import platform
import sys

import torch

import fusedgpt
from fusedgpt.ops._backend import choose_backend, triton_interpreter_enabled

OP_FAMILIES = ("layer_norm", "bias_act", "kv_append", "attention", "decode_attention")


def info_lines() -> list[str]:
    import triton

    lines = [
        f"fusedgpt      {fusedgpt.__version__}",
        f"python        {platform.python_version()}",
        f"torch         {torch.__version__} (CUDA {torch.version.cuda or 'none: CPU-only build'})",
        f"triton        {triton.__version__}{' (TRITON_INTERPRET=1: kernels run on the CPU)' if triton_interpreter_enabled() else ''}",
    ]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            lines.append(f"gpu {index}         {props.name}, sm_{props.major}{props.minor}, "
                         f"{props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs")
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        lines.append("gpu           none visible (CPU tensors use the PyTorch reference"
                     f"{' or the Triton interpreter' if triton_interpreter_enabled() else ''})")
        device = torch.device("cpu")
    if fusedgpt.extension_available():
        lines.append(f"extension     fusedgpt._C built for {', '.join(fusedgpt.extension_cuda_archs())}")
    else:
        lines.append(f"extension     NOT AVAILABLE: {fusedgpt.extension_unavailable_reason()}")
    for family in OP_FAMILIES:
        try:
            backend = choose_backend(family, device)
        except ValueError as error:
            backend = f"error: {error}"
        lines.append(f"{family:<13} {backend} (on {device})")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fusedgpt", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, GPU, extension build and backend per op")
    args = parser.parse_args(argv)
    if args.command == "info":
        print("\n".join(info_lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
