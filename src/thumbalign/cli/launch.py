"""`--num-processes N`: the same command again in N linked processes, through the launchers that exist."""

from __future__ import annotations

import codecs
import os
import signal
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Callable

from ..errors import ConfigError, ThumbalignError
from ..files import load_settings_yaml
from .launcher_output import LauncherOutput
from .options import build_config

LAUNCHER_FLAGS = ("--num-processes", "--accelerate-config", "--num-machines", "--machine-rank", "--main-process-ip",
                  "--main-process-port", "--rendezvous-timeout")


LAUNCHED = "THUMBALIGN_LAUNCHED"


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


def accelerate_config_path(choice: str):
    """A shipped config by its name (the files of thumbalign/accelerate_configs), or the user's own file."""
    shipped = resources.files("thumbalign") / "accelerate_configs" / f"{choice}.yaml"
    return shipped if "/" not in choice and shipped.is_file() else Path(choice)


def check_accelerate_config(config) -> None:
    """What the accelerate config asks for must run here, said in one line naming the setting before any process
    starts (afterwards a failure is N tracebacks from N processes)."""
    if not config.accelerate_config:
        return
    where = f"--accelerate-config {config.accelerate_config}"
    path = accelerate_config_path(config.accelerate_config)
    if not path.exists():
        raise ConfigError(f"{where}: cannot read {path} (No such file or directory)")
    settings = load_settings_yaml(path, "the accelerate config") or {}
    if not isinstance(settings, dict):
        raise ConfigError(f"{where}: {path} is not a mapping of accelerate settings")
    from ..engine.sharding import check_accelerate_settings

    check_accelerate_settings(settings, where)


def launch_processes(argv: list[str], config) -> int:
    """Re-run this same command in `num_processes` linked processes.

    With an accelerate config, or GPUs: `accelerate launch` (with a shipped DDP / DeepSpeed ZeRO / FSDP2 config, or
    the user's; all of them run on CPU processes too). CPUs otherwise:
    `torch.distributed.run`, which starts N processes that find each other and train on the gloo backend. (Plain
    `accelerate launch --cpu --num_processes N` starts one process; without --cpu, N unlinked copies.)
    """
    import torch

    n, machines = config.num_processes, config.num_machines
    if torch.cuda.is_available() or config.accelerate_config:
        # accelerate counts the processes of all machines together
        command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(n * machines)]
        if config.accelerate_config:
            command += ["--config_file", str(accelerate_config_path(config.accelerate_config))]
        else:
            command += ["--multi_gpu"]
        if machines > 1:
            command += ["--num_machines", str(machines), "--machine_rank", str(config.machine_rank),
                        "--main_process_ip", config.main_process_ip, "--main_process_port",
                        str(config.main_process_port), "--rdzv_conf", f"timeout={config.rendezvous_timeout}"]
    elif machines > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(machines), "--node_rank",
                   str(config.machine_rank), "--master_addr", config.main_process_ip, "--master_port",
                   str(config.main_process_port), "--rdzv-conf", f"timeout={config.rendezvous_timeout}",
                   "--nproc_per_node", str(n)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n)]
    command += ["-m", "thumbalign", *without_launcher_flags(argv), "--num-processes", "1"]
    where = f" on machine {config.machine_rank} of {machines}" if machines > 1 else ""
    print(f"Launching {n} process{'es' if n > 1 else ''}{where}: {' '.join(command)}", flush=True)
    env = {**os.environ, LAUNCHED: "1"}  # for the processes started below
    code, tail, output, stopped_by = _call_watching_stderr(command, env)
    if stopped_by == signal.SIGINT:  # interrupted, whatever the launcher's exit code: one line, exit code 130
        if not any(line.startswith("thumbalign: interrupted") for line in output.said):
            raise KeyboardInterrupt  # said by no process (stopped before they could): said here
        return 130
    if stopped_by:
        return 128 + stopped_by
    failure = rendezvous_failure(tail, config) if code and machines > 1 else None
    if failure:
        raise ConfigError(failure)
    if code and not output.said:  # the processes were stopped before they could say why
        raise LaunchError(f"a process of the {n} ended with exit code {output.child_exit_code or code} (its output "
                          "is above)")
    return output.child_exit_code if code and output.child_exit_code and output.child_exit_code > 0 else code


class LaunchError(ThumbalignError):
    pass


def _call_watching_stderr(command: list[str], env: dict) -> tuple[int, str, LauncherOutput, int | None]:
    """Run `command` with its stderr passed through as it comes (progress bars included), less the launcher's own
    report on a failed process (THUMBALIGN_DEBUG=1 keeps it), and its last 64 KiB kept. Ctrl-C (and SIGTERM, SIGHUP)
    is passed on to the launcher, which stops its processes; returns the exit code, the tail, the filter, and the
    signal that came (None if none did)."""
    # The launcher runs in a process group of its own, so that a Ctrl-C at the terminal reaches it once, from here.
    # Reached twice (the terminal's, then ours), torchrun raises again in the middle of stopping its processes and
    # exits at once: it no longer waits for them, and its exit code depends on which signal came first.
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, env=env, process_group=0)
    received: list[int] = []

    def pass_on(signum, frame) -> None:
        if signum not in received:  # once each: a second Ctrl-C would cut the launcher's shutdown short
            proc.send_signal(signum)
            received.append(signum)

    previous = {sig: signal.signal(sig, pass_on) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        output = LauncherOutput()
        tail = _pass_through(proc, output)
        return proc.wait(), tail, output, (received or [None])[0]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _pass_through(proc: subprocess.Popen, output: LauncherOutput) -> str:
    """The launcher's stderr, filtered by `output`, onto ours until it closes; returns its last 64 KiB."""
    tail, ends_line = b"", True
    raw = bool(os.environ.get("THUMBALIGN_DEBUG"))
    decoder = codecs.getincrementaldecoder("utf-8")("replace")  # a 👍 may be split between two reads
    while chunk := os.read(proc.stderr.fileno(), 65536):  # a signal's handler runs, then the read goes on
        tail = (tail + chunk)[-65536:]
        text = decoder.decode(chunk)
        shown = text if raw else output.feed(text)
        sys.stderr.write(shown)
        sys.stderr.flush()
        ends_line = shown.endswith("\n") if shown else ends_line
    rest = output.close()
    sys.stderr.write(rest + ("" if (rest.endswith("\n") if rest else ends_line) else "\n"))  # after a bar
    return tail.decode("utf-8", "replace")


def rendezvous_failure(stderr_tail: str, config) -> str | None:
    """The launcher's rendezvous timeout, as one line saying which machine is missing and what to check."""
    import re

    where = f"{config.main_process_ip}:{config.main_process_port}"
    seconds = f"within {config.rendezvous_timeout} s (--rendezvous-timeout)"
    joined = re.search(r"waiting for clients\. (\d+)/(\d+) clients joined", stderr_tail)
    if joined:
        return (f"only {joined.group(1)} of {joined.group(2)} machines joined the rendezvous at {where} {seconds}: "
                "start the same command on every machine, each with its own --machine-rank")
    if re.search(r"DistNetworkError: .*timed out .*trying to connect", stderr_tail):
        return (f"machine {config.machine_rank} could not reach machine 0 at {where} {seconds}: start the same "
                f"command there with --machine-rank 0, and check that {where} is reachable from this machine")
    return None


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
    if config.rendezvous_timeout <= 0:
        raise ConfigError(f"--rendezvous-timeout must be positive, got {config.rendezvous_timeout}")
    if not 0 < config.main_process_port < 65536:
        raise ConfigError(f"--main-process-port {config.main_process_port} is not a port number")


def run_training(args, argv: list[str], config_class, trainer: Callable[[], Callable]) -> int:
    """Settings from the flags and the YAML file, then either the run in this process or, with --num-processes N
    (and not already one of N), the launch of N. `trainer()` imports the trainer only when it runs: the imports load
    torch, which --help never needs."""
    config = build_config(args, config_class)
    check_machines(config)
    if will_launch(config):
        check_accelerate_config(config)
        return launch_processes(argv, config)
    trainer()(config)
    return 0


def will_launch(config) -> bool:
    """This command starts the processes of a launched run (rather than being one of them, or the only one)."""
    # one process with an accelerate config is launched too: DeepSpeed's offload or ZeRO-3 on a single GPU is a
    # reason to ask for one, and only a launched process runs under it
    launched = config.num_processes > 1 or config.num_machines > 1 or config.accelerate_config
    # a process this launch started never launches again (a config file may still name the accelerate config, and
    # accelerate's single-process launcher sets no WORLD_SIZE)
    return bool(launched) and "WORLD_SIZE" not in os.environ and LAUNCHED not in os.environ
