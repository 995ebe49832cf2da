"""Optimizer-state offload (``deepspeed.zero_optimization.offload_optimizer: {device: cpu}``).

ZeRO-1/2 then keep the fp32 master weights, Adam's moments and the fp32 gradients of each rank's
partition in host memory and step them there with DeepSpeed's CPU Adam (a C++ extension DeepSpeed
compiles on first use with ninja and the C++ compiler), so a GPU holds only the bit16 parameters,
gradients and activations. With expert parallelism each expert-data-parallel group partitions its
experts' state as without offload (``moetrain/parallel/deepspeed_moe.py``).

- :func:`check_offload`: before any heavy setup, that the extension is installed or can be built
  (a clear UserError, exit 2, otherwise); ``moetrain train``, ``validate`` and ``plan`` call it;
- :func:`build_optimizer`: the AdamW moetrain steps, ``DeepSpeedCPUAdam`` (``adamw_mode``, the same
  update) when offloading, torch's ``AdamW`` otherwise.

The config side (offload needs ZeRO-1/2, no parameter or NVMe offload) is validated with the config
(``moetrain/config/deepspeed.py``). Checkpoints are layout-free: a run saved with offload resumes
without it and the other way round (``state_io`` reads and writes CPU Adam's state like torch's).
"""

from __future__ import annotations

import os
import shutil

import torch

from moetrain.config.deepspeed import offload_device
from moetrain.config.job import JobConfig
from moetrain.config.training import OptimConfig
from moetrain.errors import UserError

FIELD = "deepspeed.zero_optimization.offload_optimizer.device"


def offloads(cfg: JobConfig) -> bool:
    return offload_device(cfg.deepspeed) == "cpu"


def cpu_adam_problem() -> str | None:
    """None when DeepSpeed's CPU Adam is installed or can be built here, else what is missing."""
    try:
        from deepspeed.git_version_info import installed_ops
        from deepspeed.ops.op_builder import CPUAdamBuilder
    except ImportError as exc:  # pragma: no cover - deepspeed is a dependency
        return f"DeepSpeed's op builder cannot be imported ({exc})"
    if installed_ops.get("cpu_adam"):
        return None  # prebuilt into the DeepSpeed installation
    if not CPUAdamBuilder().is_compatible(verbose=False):
        return "DeepSpeed reports its CPU Adam extension incompatible with this machine"
    from torch.utils.cpp_extension import is_ninja_available

    if not is_ninja_available():
        return "ninja is not installed (pip install ninja), and DeepSpeed builds its CPU Adam extension with it"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler {compiler!r} on PATH (CXX), which DeepSpeed's CPU Adam extension is built with"
    return None


def check_offload(cfg: JobConfig) -> None:
    """Refuse offload (UserError, exit 2) where DeepSpeed's CPU Adam can be neither loaded nor built."""
    if not offloads(cfg):
        return
    problem = cpu_adam_problem()
    if problem is not None:
        raise UserError(
            f"{FIELD} (cpu) steps the optimizer with DeepSpeed's CPU Adam, which cannot be built here: {problem}; "
            f"install what is missing, or remove {FIELD}"
        )


def build_optimizer(groups: list[dict], optim: OptimConfig, offload: bool) -> torch.optim.Optimizer:
    """AdamW over ``groups``: DeepSpeed's CPU Adam when the state is offloaded, else torch's."""
    if not offload:
        return torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps, fused=optim.fused)
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps, adamw_mode=True)
    except Exception as exc:  # noqa: BLE001 - the extension's build failed: the user's toolchain
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{FIELD} (cpu): DeepSpeed's CPU Adam extension failed to build or load ({first})") from None
