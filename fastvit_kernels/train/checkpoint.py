"""Checkpoints written so that the last good one survives any interruption, and Ctrl-C that saves before it stops."""

import os
import signal
import threading
from pathlib import Path

import torch

from .distributed import all_sum


def save_checkpoint(path: Path, state: dict) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: the last good checkpoint is never left half
    written, whatever interrupts the save."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class GracefulStop:
    """First Ctrl-C: finish the batch in flight, save, exit (the resume is then exact). A second Ctrl-C stops at once.

    Under DDP every rank gets the signal, possibly during different batches, so the decision is taken together
    (a max all-reduce of the flag after each batch) and every rank stops after the same batch.
    """

    def __init__(self, device, world):
        self.requested, self.device, self.world, self._old = False, device, world, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: finishing this batch, then saving (Ctrl-C again to stop at once)", flush=True)

    def should_stop(self) -> bool:
        if self.world == 1:
            return self.requested
        return all_sum([float(self.requested)], self.device, self.world)[0] > 0
