"""Shared test set-up."""

import os

# Triton kernels run through the interpreter on machines without CUDA. Must be set before
# triton is first imported anywhere in the test session.
try:
    import torch

    _has_cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")
