"""The numbers between two log lines: per-example statistics of every process, tokens, samples and time."""

from __future__ import annotations

import time
from typing import Callable

import torch


class MetricsWindow:
    """Collects the per-example statistics a trainer reports for each micro-batch, gathered from every process, so
    that each log line speaks for the whole run and not for one process."""

    def __init__(self, gather: Callable[[torch.Tensor], torch.Tensor]):
        self.gather = gather
        self.reset()

    def reset(self) -> None:
        self.stats: list[dict[str, torch.Tensor]] = []
        self.tokens, self.samples, self.start = 0, 0, time.perf_counter()

    def mark(self) -> tuple[int, int, int]:
        return len(self.stats), self.tokens, self.samples

    def rollback(self, mark) -> None:
        """Forget what a skipped step added."""
        del self.stats[mark[0]:]
        self.tokens, self.samples = mark[1], mark[2]

    def add(self, stats: dict[str, torch.Tensor], tokens: int, samples: int, device) -> None:
        self.stats.append({name: self._gathered(t) for name, t in stats.items()})
        counts = self.gather(torch.tensor([[tokens, samples]], device=device)).sum(0)
        self.tokens += int(counts[0])
        self.samples += int(counts[1])

    def _gathered(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        if t.dtype == torch.bool:  # gloo has no bool collectives
            return self.gather(t.to(torch.uint8)).bool().cpu()
        return self.gather(t.float()).cpu()

    def take(self) -> tuple[dict[str, torch.Tensor], float, float]:
        """Every statistic concatenated over the window, samples/s and tokens/s; then start a new window."""
        names = self.stats[0].keys() if self.stats else ()
        stats = {name: torch.cat([s[name] for s in self.stats]) for name in names}
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rates = (self.samples / elapsed, self.tokens / elapsed)
        self.reset()
        return stats, *rates
