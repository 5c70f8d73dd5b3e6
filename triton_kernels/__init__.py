"""Triton kernels and their host launchers (no torch.library, no autograd: see python/fusedgpt/ops/).

Everything here also runs on the CPU under TRITON_INTERPRET=1, which is how CI tests it: no libdevice
calls, fp32 math after every load."""
