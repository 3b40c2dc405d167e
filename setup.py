"""Install amc. Runtime deps are what the package imports; `[test]` adds the peers we compare against."""
from pathlib import Path

from setuptools import find_packages, setup

version = {}
exec(Path(__file__).with_name("amc").joinpath("version.py").read_text(), version)

setup(
    name="amc",
    version=version["__version__"],
    description="Auto Model Compressor: trace, prune, decompose, tune and fine-tune PyTorch networks",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["amc", "amc.*"]),
    python_requires=">=3.9",
    install_requires=[
        "torch",
        "torchvision",
        "numpy",
        "scikit-learn",
        "tensorboardX",
        "graphviz",
        "tqdm",
        "safetensors",
        "onnx",
        "onnxruntime",
    ],
    extras_require={
        "test": [
            "pytest",
            "pytest-timeout",
            "pytest-xdist",
            "scikit-image",
            "timm",
            "torch-pruning==1.6.1",
            "fvcore",
            "thop",
            "matplotlib",
        ],
    },
    entry_points={"console_scripts": ["amc=amc.cli:main"]},
)
