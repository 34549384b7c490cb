"""DeepSpeed ZeRO-1/2 (`--accelerate-config zero2`): every process keeps the whole working weights; the fp32 master
weights and Adam moments (and, stage 2, the gradients) are split over the processes. A checkpoint gathers each
parameter's pieces one parameter at a time and the main process writes them like any unsharded run's checkpoint,
which any run can resume from."""

from __future__ import annotations

from .. import checkpoint as ckpt
from . import zero


class Zero12(zero.DeepSpeedBackend):
    name = "DeepSpeed ZeRO-1/2"

    @classmethod
    def chosen(cls, accelerator) -> bool:
        return zero.requested() and zero.stage(accelerator) in (1, 2)

    def save_checkpoint(self, checkpoints, step, model, optimizer, scheduler, state, keep, is_main, barrier) -> None:
        # the optimizer's pieces, put together one parameter at a time by every process
        gathered = zero.gathered_state(model, optimizer, is_main)
        if is_main:
            ckpt.save_checkpoint(checkpoints, step, model, optimizer, scheduler, state, keep, gathered)

    def load_own(self, path, tag, module, model, optimizer) -> bool:
        return False  # every checkpoint is read whole: each process keeps its pieces of the moments

    def put_whole(self, model, optimizer, weights, optim) -> None:
        zero.set_whole(model, optimizer, weights, optim)
