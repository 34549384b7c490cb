"""`--num-processes N`: the same command again in N linked processes, through the launchers that exist."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import resources
from typing import Callable

from ..errors import ConfigError
from .options import build_config

SHIPPED_ACCELERATE_CONFIGS = ("ddp", "zero2", "zero3", "fsdp")
LAUNCHER_FLAGS = ("--num-processes", "--accelerate-config", "--num-machines", "--machine-rank", "--main-process-ip",
                  "--main-process-port")


def without_launcher_flags(argv: list[str]) -> list[str]:
    """The command line minus the launcher's own flags (every process reads the same config)."""
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in LAUNCHER_FLAGS:
            skip = True
        elif not arg.startswith(tuple(f + "=" for f in LAUNCHER_FLAGS)):
            rest.append(arg)
    return rest


def launch_processes(argv: list[str], config) -> int:
    """Re-run this same command in `num_processes` linked processes.

    GPUs: `accelerate launch` (with a shipped DDP / DeepSpeed ZeRO / FSDP2 config, or the user's). CPUs:
    `torch.distributed.run`, which starts N processes that find each other and train on the gloo backend. (Plain
    `accelerate launch --cpu --num_processes N` starts one process; without --cpu, N unlinked copies.)
    """
    import torch

    n, machines = config.num_processes, config.num_machines
    if torch.cuda.is_available() or config.accelerate_config:
        # accelerate counts the processes of all machines together
        command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(n * machines)]
        if config.accelerate_config in SHIPPED_ACCELERATE_CONFIGS:
            path = resources.files("thumbalign") / "accelerate_configs" / f"{config.accelerate_config}.yaml"
            command += ["--config_file", str(path)]
        elif config.accelerate_config:
            command += ["--config_file", config.accelerate_config]
        else:
            command += ["--multi_gpu"]
        if machines > 1:
            command += ["--num_machines", str(machines), "--machine_rank", str(config.machine_rank),
                        "--main_process_ip", config.main_process_ip, "--main_process_port",
                        str(config.main_process_port)]
    elif machines > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(machines), "--node_rank",
                   str(config.machine_rank), "--master_addr", config.main_process_ip, "--master_port",
                   str(config.main_process_port), "--nproc_per_node", str(n)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n)]
    command += ["-m", "thumbalign", *without_launcher_flags(argv), "--num-processes", "1"]
    where = f" on machine {config.machine_rank} of {machines}" if machines > 1 else ""
    print(f"Launching {n} processes{where}: {' '.join(command)}", flush=True)
    return subprocess.call(command)


def check_machines(config) -> None:
    """A multi-machine run names machine 0's address and this machine's rank among them."""
    if config.num_machines < 1 or config.num_processes < 1:
        raise ConfigError("--num-machines and --num-processes must be at least 1")
    if config.num_machines == 1:
        return
    if not config.main_process_ip:
        raise ConfigError(f"--num-machines {config.num_machines} needs --main-process-ip: the address of machine 0, "
                          "reachable from every machine")
    if not 0 <= config.machine_rank < config.num_machines:
        raise ConfigError(f"--machine-rank {config.machine_rank} is not one of 0 … {config.num_machines - 1}")
    if not 0 < config.main_process_port < 65536:
        raise ConfigError(f"--main-process-port {config.main_process_port} is not a port number")


def run_training(args, argv: list[str], config_class, trainer: Callable[[], Callable]) -> int:
    """Settings from the flags and the YAML file, then either the run in this process or, with --num-processes N
    (and not already one of N), the launch of N. `trainer()` imports the trainer only when it runs: the imports load
    torch, which --help never needs."""
    config = build_config(args, config_class)
    check_machines(config)
    if (config.num_processes > 1 or config.num_machines > 1) and "WORLD_SIZE" not in os.environ:
        return launch_processes(argv, config)
    trainer()(config)
    return 0
