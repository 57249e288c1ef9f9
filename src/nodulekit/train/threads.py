"""A CPU thread count that another process may raise while a training runs.

The demo trains the classifier in a child process on one core while the compression study works
on the other; once the study has nothing left to do but wait for it, the demo raises the child's
count, and the training takes both cores from its next step on. PyTorch's intra-op thread count
belongs to the thread that sets it (OpenMP), so the training loop applies the count itself,
between steps (:func:`follow`), rather than a watcher thread beside it.
"""

from __future__ import annotations

_shared = None  # a multiprocessing.Value("i") shared with the parent process, or None


def attach(value) -> None:
    """Make ``value`` (a shared integer; 0 or less: leave the count alone) this process's thread budget."""
    global _shared
    _shared = value


def follow() -> None:
    """Set PyTorch's thread count to the budget, when one is attached and it differs."""
    if _shared is None:
        return
    import torch

    n = int(_shared.value)
    if n > 0 and n != torch.get_num_threads():
        torch.set_num_threads(n)
