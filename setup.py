from pathlib import Path

from setuptools import find_packages, setup

README = Path(__file__).with_name("README.md")

setup(
    name="fused_objectives",
    version="0.1.0",
    description=("Fused LM-head + softmax + probability-based SFT objectives (NLL, -p, -p^10, thresholded "
                 "variants, your own) in Triton kernels: the [tokens, vocab] logits never exist in memory."),
    long_description=README.read_text() if README.exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # the C++ source of backend="cpu" ships inside the package (fused_objectives/_csrc/) and is
    # compiled on first use (torch.utils.cpp_extension + ninja), so a wheel needs no build step
    packages=find_packages(include=["fused_objectives", "fused_objectives.*"]) + ["fused_objectives._csrc"],
    package_dir={"fused_objectives._csrc": "csrc"},
    package_data={"fused_objectives._csrc": ["*.cpp"]},
    install_requires=[
        "torch>=2.4",
        "ninja",
        "triton>=3.0; platform_system == 'Linux'",
    ],
    extras_require={
        "hf": ["transformers>=4.56", "accelerate", "peft", "trl", "datasets"],
        "bench": ["liger-kernel", "matplotlib", "tqdm"],
        # deepspeed: the ZeRO-3 tests (tests/test_distributed.py) run its real engine on CPU (a pure-Python
        # sdist; its C++ ops are compiled on first use, none at install)
        "dev": ["pytest", "pytest-benchmark", "pytest-xdist", "deepspeed; platform_system == 'Linux'"],
    },
    entry_points={"console_scripts": ["fused-objectives=fused_objectives.cli:main"]},
)
