"""Stop cleanly on SIGTERM or SIGINT: finish the current update, agree across processes, save, exit."""
import signal
from types import FrameType
from typing import Optional

import torch
from accelerate import Accelerator


class StopRequest:
    """Catches SIGTERM/SIGINT and tells the loop when every process should stop at the same update.

    One process alone: the flag is read after every update (no synchronisation). Several: the flags are summed
    over processes every `check_every` updates, so all stop after the same update and none waits in a collective
    for a peer that already left. A second SIGINT aborts at once (Ctrl-C twice).
    """

    def __init__(self, acc: Accelerator, check_every: int = 10):
        self.acc, self.check_every = acc, check_every
        self.signal: Optional[str] = None
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        self.acc.print(f'[shake-vit] {self.signal} received: finishing this update, then saving a checkpoint')

    def should_stop(self, update: int) -> bool:
        if self.acc.num_processes == 1:
            return self.signal is not None
        if update % self.check_every:
            return False
        flag = torch.tensor([float(self.signal is not None)], device=self.acc.device)
        return self.acc.reduce(flag, 'sum').item() > 0

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
