"""How a run computes float32 matrix products: ``matmul_precision`` (a top-level config field).

``highest`` (the default) keeps float32 products, and with them every result this project documents and
tests bit for bit. ``high`` lets GPUs with TF32 use it; ``medium`` lets torch compute float32 products
in bfloat16 where the hardware has fast bfloat16 units (CPUs with AMX or AVX-512 BF16, GPUs with tensor
cores). That is torch's own switch, ``torch.set_float32_matmul_precision``, as PyTorch Lightning's
``precision`` flag and ``torch.autocast`` use it: parameters, optimiser state and everything else stay
float32, only the products' inputs are rounded. Large minibatches gain most (MADDPG / QMIX with 4,096
samples); small ones can be slower than float32 (a SUPER update's 32-sample products are), and results
change from the third significant digit of the products on, so runs are not comparable bit for bit
with ``highest`` ones (``benchmarks/compare_anchors.py`` measures speed and final return side by side).

The setting is process-wide, so a run applies it when it starts and gives the process back the one it
had when it ends (a notebook keeps its own), and its worker processes (evaluation, collectors) apply it
too, so they compute what the training process would.
"""

from __future__ import annotations

import torch

MATMUL_PRECISIONS = ("highest", "high", "medium")


def check_matmul_precision(value: str) -> None:
    """``ValueError`` naming ``value`` and the accepted ones."""
    if value not in MATMUL_PRECISIONS:
        raise ValueError(f"matmul_precision={value!r} is not a precision; accepted: {', '.join(MATMUL_PRECISIONS)} "
                         "(highest: float32 products, bit-exact; medium: bfloat16 products where the CPU or GPU has "
                         "them)")


def apply_matmul_precision(value: str) -> str:
    """Set torch's float32 matmul precision for this process; return the one it replaces."""
    check_matmul_precision(value)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(value)
    return before
