"""A fixed-size, time-stamped ring of feature tensors (per-frame visual or scene-audio features)."""
from __future__ import annotations

import threading

import numpy as np
import torch


class TimedRing:
    """`capacity` items of `shape`, each with a time; the oldest is overwritten when full.

    Memory is allocated once (`nbytes` never changes). Times must be non-decreasing.
    Thread-safe: one thread may push while another reads windows.
    """

    def __init__(self, capacity: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu"):
        if not (isinstance(capacity, int) and capacity > 0):
            raise ValueError(f"TimedRing capacity must be a positive int, got {capacity!r}")
        shape = tuple(int(s) for s in shape)
        if any(s <= 0 for s in shape):
            raise ValueError(f"TimedRing item shape must be positive sizes, got {shape}")
        self.capacity, self.shape = capacity, shape
        self._items = torch.zeros((capacity, *shape), dtype=dtype, device=device)  # (C, *shape)
        self._times = torch.zeros(capacity, dtype=torch.float64)                     # (C,) CPU
        self._lock = threading.Lock()
        self.clear()

    @property
    def dtype(self) -> torch.dtype:
        return self._items.dtype

    @property
    def device(self) -> torch.device:
        return self._items.device

    @property
    def nbytes(self) -> int:
        """Bytes held by the ring (items + times); constant for its lifetime."""
        return (self._items.numel() * self._items.element_size()
                + self._times.numel() * self._times.element_size())

    def __len__(self) -> int:
        return self._len

    @property
    def last_time(self) -> float | None:
        """Time of the newest item, None when empty."""
        return self._last_t

    def clear(self) -> None:
        """Forget every item (memory is kept); time may start again from anything."""
        with self._lock:
            self._head = 0          # slot the next push writes
            self._len = 0
            self._last_t: float | None = None

    def _check_item(self, item, batch: bool) -> torch.Tensor:
        item = torch.as_tensor(item)
        want = (item.shape[0], *self.shape) if batch and item.dim() > 0 else self.shape
        if tuple(item.shape) != tuple(want):
            what = "items" if batch else "item"
            raise ValueError(f"TimedRing {what} must have shape {'(n, ' if batch else '('}"
                             f"{', '.join(map(str, self.shape))}), got {tuple(item.shape)}")
        return item

    def push(self, t: float, item) -> None:
        """Append one item of `shape` at time t (>= the last time)."""
        item = self._check_item(item, batch=False)
        t = float(t)
        with self._lock:
            if self._last_t is not None and t < self._last_t:
                raise ValueError(f"TimedRing times must be non-decreasing: got t={t} after "
                                 f"{self._last_t}; clear() the ring to start a new timeline")
            self._items[self._head].copy_(item)
            self._times[self._head] = t
            self._head = (self._head + 1) % self.capacity
            self._len = min(self._len + 1, self.capacity)
            self._last_t = t

    def push_many(self, times, items) -> None:
        """Append n items (n, *shape) at n non-decreasing times (the first >= the last time)."""
        items = self._check_item(items, batch=True)
        times = torch.as_tensor(np.asarray(times, dtype=np.float64)).reshape(-1)  # (n,)
        n = times.numel()
        if n != items.shape[0]:
            raise ValueError(f"push_many got {n} times for {items.shape[0]} items")
        if n == 0:
            return
        if n > 1 and bool((times[1:] < times[:-1]).any()):
            raise ValueError("TimedRing times must be non-decreasing within push_many")
        with self._lock:
            if self._last_t is not None and float(times[0]) < self._last_t:
                raise ValueError(f"TimedRing times must be non-decreasing: got t="
                                 f"{float(times[0])} after {self._last_t}; clear() the ring "
                                 f"to start a new timeline")
            keep = min(n, self.capacity)                    # older ones would be overwritten
            slots = (self._head + (n - keep) + torch.arange(keep)) % self.capacity
            self._items[slots.to(self._items.device)] = items[n - keep:].to(
                self._items.device, self._items.dtype)
            self._times[slots] = times[n - keep:]
            self._head = (self._head + n) % self.capacity
            self._len = min(self._len + n, self.capacity)
            self._last_t = float(times[-1])

    def _order(self) -> torch.Tensor:
        """Slots of the stored items, oldest first (call with the lock held)."""
        start = (self._head - self._len) % self.capacity
        return (start + torch.arange(self._len)) % self.capacity  # (len,)

    def window(self, t_start: float, t_end: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Items with t_start <= t <= t_end, oldest first, as copies: ((n, *shape), (n,))."""
        if t_end < t_start:
            raise ValueError(f"window end {t_end} is before its start {t_start}")
        with self._lock:
            order = self._order()
            times = self._times[order]                                        # (len,)
            lo = int(torch.searchsorted(times, torch.tensor([float(t_start)],
                                                            dtype=torch.float64)))
            hi = int(torch.searchsorted(times, torch.tensor([float(t_end)],
                                                            dtype=torch.float64), right=True))
            sel = order[lo:hi]
            return self._items[sel.to(self._items.device)], times[lo:hi]  # gathers copy

    def latest(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The newest min(n, len) items, oldest first, as copies: ((m, *shape), (m,))."""
        if n < 0:
            raise ValueError(f"latest(n) needs n >= 0, got {n}")
        with self._lock:
            sel = self._order()[max(0, self._len - n):]
            return self._items[sel.to(self._items.device)], self._times[sel]  # gathers copy
