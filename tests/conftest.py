"""Test-session set-up that must happen before any test module imports Triton."""

import os

import torch

# Without a GPU, Triton kernels can only run in Triton's interpreter, which is chosen when a kernel is
# decorated: set it before any module (ours or a library's) imports and decorates one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
