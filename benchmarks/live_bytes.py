"""Peak bytes of live tensors (what ``torch.cuda.max_memory_allocated`` counts on a GPU), measured on any device:
a dispatch mode that adds each storage an op creates and subtracts it when the storage is freed."""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary


class LiveBytes(TorchDispatchMode):
    """``keep(tensors)`` counts what already exists (weights, optimizer state, the KV pool); inside ``with``, every
    new storage counts until it is freed. ``peak`` is the most ever live at once."""

    def __init__(self):
        super().__init__()
        self._seen = WeakIdKeyDictionary()
        self._finalizers = []
        self.current = self.peak = 0

    def keep(self, tensors) -> None:
        for t in tensors:
            self._track(t)
        self.peak = max(self.peak, self.current)

    def _track(self, t) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        storage = t.untyped_storage()
        if storage in self._seen:
            return
        size = storage.nbytes()
        self._seen[storage] = size
        self.current += size
        self._finalizers.append(weakref.ref(storage, lambda _, size=size: self._free(size)))

    def _free(self, size: int) -> None:
        self.current -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self._track(t)
        self.peak = max(self.peak, self.current)
        return out
