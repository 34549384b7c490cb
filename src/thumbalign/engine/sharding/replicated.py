"""Whole weights in every process: one process, or several under DDP (accelerate wraps the module; the gradients are
averaged over the processes). Every default of :class:`~.base.Backend` is this backend's behaviour; it is the one a
run gets when the launch asks for no other."""

from __future__ import annotations

from .base import Backend


class Replicated(Backend):
    name = "whole weights (one process or DDP)"
