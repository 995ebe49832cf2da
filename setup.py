"""moetrain: Mixture-of-Experts training with expert parallelism and StableMoE routing.

torch is deliberately not an install requirement: a bare ``torch`` requirement on a machine without
torch pulls the multi-GB CUDA build. Install the build you want first (``pip install torch==2.13.0``
takes the CPU wheel here; see pytorch.org for CUDA), then ``pip install -e .``. DeepSpeed, which
needs torch, is installed after it as a normal requirement.
"""

import os
import subprocess
import sys

from setuptools import find_packages, setup

TORCH_HINT = (
    "moetrain needs PyTorch installed before it, so that you choose the build:\n"
    "  CPU:  pip install torch==2.13.0\n"
    "  CUDA: see https://pytorch.org/get-started/locally/\n"
    "then run this install again (set MOETRAIN_SKIP_TORCH_CHECK=1 to skip this check)."
)


def _check_torch_installed() -> None:
    # pip builds in an isolated environment; `python -I` sees the target interpreter's own
    # site-packages, which is where torch must already be.
    if os.environ.get("MOETRAIN_SKIP_TORCH_CHECK") == "1":
        return
    probe = subprocess.run([sys.executable, "-I", "-c", "import torch"], capture_output=True)
    if probe.returncode != 0:
        sys.exit("error: PyTorch is not installed.\n" + TORCH_HINT)


if any(cmd in sys.argv for cmd in ("egg_info", "develop", "install", "bdist_wheel", "editable_wheel")):
    _check_torch_installed()

setup(
    name="moetrain",
    version="0.1.0",
    description="Mixture-of-Experts training with expert parallelism and StableMoE two-stage routing",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[*find_packages(include=["moetrain", "moetrain.*"]), "moetrain.kernels", "moetrain.launch"],
    package_dir={"moetrain.kernels": "kernels", "moetrain.launch": "launch"},
    package_data={"moetrain.launch": ["templates/*"]},
    install_requires=[
        # Expert parallelism writes DeepSpeed's private MoE group tables; tested on 0.19.8
        # (tests/test_deepspeed_contract.py fails loudly when a release changes them).
        "deepspeed>=0.19.8,<0.20",
        "datasets>=2.19",
        "tokenizers>=0.19",  # tokenizer.json files and the byte-level BPE moetrain trains (no transformers)
        "pydantic>=2.5",
        "pyyaml>=6.0",
        "tqdm>=4.0",
        "numpy>=1.24",
        "safetensors>=0.4",  # checkpoints: tensors without pickles
        "matplotlib>=3.7",
        "jinja2>=3.1.6",  # chat templates, rendered in its sandbox (older releases have known sandbox escapes)
    ],
    extras_require={
        # transformers: tests/test_export.py loads exported models with it (skipped without it)
        "test": [
            "pytest>=8",
            "pytest-timeout>=2.2",
            "pytest-xdist>=3.5",
            "triton>=3.0",
            "ruff==0.17.6",
            "transformers==5.24.0",
        ],
        "wandb": ["wandb>=0.16"],
        "hf": ["transformers>=4.40"],  # hub tokenizers; loading `moetrain export` folders (tested: 5.24.0)
    },
    entry_points={"console_scripts": ["moetrain=moetrain.cli:entry"]},
)
