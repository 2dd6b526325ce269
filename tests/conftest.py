"""Test setup: without CUDA, Triton kernels run under the interpreter on CPU tensors.

TRITON_INTERPRET must be set before any @triton.jit function is defined, i.e. before the kernel
modules are imported; fused_objectives imports them lazily, so setting it here is early enough.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

import fused_objectives  # noqa: E402  (after TRITON_INTERPRET)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# Fused backends the core suite runs on (the reference is the ground truth, always tested).
FUSED_BACKENDS = ["triton", "triton_chunked", "triton_fused", "cpu"]


@pytest.fixture(params=FUSED_BACKENDS)
def fused_backend(request):
    return request.param
