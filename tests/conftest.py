"""Test configuration. Without a GPU, Triton kernels run in the interpreter on CPU tensors; the variable
must be set before any module defining @triton.jit kernels is imported, hence here, first."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import stabkernels  # noqa: E402,F401


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
