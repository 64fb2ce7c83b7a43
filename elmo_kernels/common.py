"""What every kernel module shares: interpreter detection, the fp8 tensor-core check, dtype maps, label padding.

One definition of each, imported by the kernels, the references, training and serving (no copies).
"""

from __future__ import annotations

import os

import torch
import triton.language as tl

# Set by the Triton interpreter (CPU); read once per call so tests may flip it before importing kernels.
INTERPRET_ENV = "TRITON_INTERPRET"

FP8_E4M3 = torch.float8_e4m3fn  # head weights and fp8 dot operands (max 448, subnormals down to 2^-9)
FP8_E5M2 = torch.float8_e5m2  # Kahan compensation rows (wider range, fewer mantissa bits)
FP8_E4M3_MAX = 448.0

# torch dtype -> Triton dtype, for the constexpr dtype arguments of kernels
TL_DTYPES = {
    torch.bfloat16: tl.bfloat16,
    torch.float8_e4m3fn: tl.float8e4nv,
    torch.float8_e5m2: tl.float8e5,
    torch.float32: tl.float32,
}

LABEL_ALIGN = 16  # fp8 GEMMs want 16-aligned leading dimensions; odd ones cost up to 7x in cuBLAS


def interpreting() -> bool:
    """True when Triton kernels run under the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get(INTERPRET_ENV) == "1"


def has_fp8_tensor_cores(device: torch.device | str) -> bool:
    """fp8 x fp8 `tl.dot` / `_scaled_mm` run natively: CUDA compute capability 8.9 (Ada) or newer."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def round_up(n: int, multiple: int = LABEL_ALIGN) -> int:
    """The smallest multiple of `multiple` >= n (label counts pad to LABEL_ALIGN rows)."""
    return -(-n // multiple) * multiple


# (mantissa bits, smallest normal exponent, largest finite value) of the 8-bit formats the kernels round to.
FP8_FORMATS = {
    FP8_E4M3: (3, -6, FP8_E4M3_MAX),
    FP8_E5M2: (2, -14, 57344.0),
}

# fp8 dots scale G = sigmoid(z) - y (|G| < 1) by this fixed power of two so that small gradients stay representable.
GRAD_FP8_SCALE = 256.0
