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
    packages=find_packages(include=["fused_objectives", "fused_objectives.*"]),
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
    ],
    extras_require={
        "hf": ["transformers>=4.56", "accelerate", "peft", "trl", "datasets"],
        "bench": ["liger-kernel", "matplotlib", "tqdm"],
        "dev": ["pytest", "pytest-benchmark", "pytest-xdist"],
    },
    entry_points={"console_scripts": ["fused-objectives=fused_objectives.cli:main"]},
)
