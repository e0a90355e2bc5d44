"""`ExpertCache`: experts held in memory under a byte budget, with two eviction policies.

- `lru`: evict the least recently used expert (the baseline of mixtral-offloading).
- `freq_distance` (EdgeMoE): evict the expert with the lowest  frequency / (1 + distance),
  where frequency is the expert's profiled activation frequency (or its running access count
  when no profile is given) and distance is how many MoE layers run before the expert's layer
  runs again: with L MoE layers and layer c computing now, an expert of layer l has distance
  (l - c - 1) mod L, so the next layer's experts (distance 0) are kept and the layers just
  computed (distance up to L - 1, not needed until the next token) go first. Ties: LRU.

The cache never holds more than `budget_bytes` (an insert evicts until the new entry fits; an
entry larger than the whole budget is refused). It is shared by the decoding thread and the
prefetch thread, so every method takes one lock.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any, Hashable, Literal, get_args

__all__ = ["ExpertCache", "CACHE_POLICIES", "CachePolicy", "cache_budget"]

CachePolicy = Literal["lru", "freq_distance"]
CACHE_POLICIES: tuple[str, ...] = get_args(CachePolicy)
Key = tuple[int, int]  # (MoE layer, expert)


def cache_budget(expert_bytes: int, fraction: float | None = None, megabytes: float | None = None) -> int | None:
    """Cache budget in bytes from a fraction of all expert bytes or from MiB; neither: None (no cache)."""
    if fraction is not None and megabytes is not None:
        raise ValueError(f"give the cache budget as a fraction ({fraction}) or in MiB ({megabytes}), not both")
    if megabytes is not None:
        return int(megabytes * 2**20)
    if fraction is not None:
        if fraction <= 0:
            raise ValueError(f"the cache budget fraction must be positive, got {fraction}")
        return int(fraction * expert_bytes)
    return None


class ExpertCache:
    def __init__(
        self,
        budget_bytes: int,
        policy: CachePolicy = "lru",
        num_layers: int = 1,
        frequencies: dict[Key, float] | None = None,
        on_evict: Callable[[Key, Any], None] | None = None,
    ) -> None:
        """on_evict(key, value): called for every value that leaves the cache (evicted or replaced)."""
        if policy not in CACHE_POLICIES:
            raise ValueError(f"cache policy must be one of {CACHE_POLICIES}, got {policy!r}")
        if budget_bytes <= 0:
            raise ValueError(f"cache budget must be positive, got {budget_bytes} bytes")
        self.budget_bytes, self.policy, self.num_layers = budget_bytes, policy, num_layers
        self.frequencies = dict(frequencies) if frequencies else None
        self.on_evict = on_evict
        self._entries: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()  # least recently used first
        self._accesses: Counter = Counter()
        self._lock = threading.RLock()
        self.bytes = 0
        self.peak_bytes = 0
        self.evictions = 0
        self.current_layer = 0  # the MoE layer computing now (set by the offloader)

    def __contains__(self, key: Key) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[Key]:
        """Cached keys, least recently used first."""
        with self._lock:
            return list(self._entries)

    def get(self, key: Key) -> Any | None:
        """The cached value (marking it most recently used), or None."""
        with self._lock:
            self._accesses[key] += 1
            if key not in self._entries:
                return None
            self._entries.move_to_end(key)
            return self._entries[key][0]

    def peek(self, key: Key) -> Any | None:
        """The cached value or None, without counting an access or refreshing recency."""
        with self._lock:
            entry = self._entries.get(key)
            return None if entry is None else entry[0]

    def put(self, key: Key, value: Any, nbytes: int) -> list[Key]:
        """Insert (or refresh) an entry, evicting per the policy until it fits. Returns the evicted keys."""
        if nbytes > self.budget_bytes:
            raise ValueError(f"expert {key} needs {nbytes} bytes, more than the whole cache budget of "
                             f"{self.budget_bytes} bytes")
        evicted = []
        with self._lock:
            if key in self._entries:
                old, old_bytes = self._entries.pop(key)
                self.bytes -= old_bytes
                if self.on_evict is not None and old is not value:
                    self.on_evict(key, old)
            while self.bytes + nbytes > self.budget_bytes:
                victim = self._victim()
                victim_value, victim_bytes = self._entries.pop(victim)
                self.bytes -= victim_bytes
                self.evictions += 1
                evicted.append(victim)
                if self.on_evict is not None:
                    self.on_evict(victim, victim_value)
            self._entries[key] = (value, nbytes)
            self.bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.bytes)
        return evicted

    def _priority(self, key: Key) -> float:
        layer = key[0]
        distance = (layer - self.current_layer - 1) % self.num_layers
        frequency = self.frequencies.get(key, 0.0) if self.frequencies is not None else float(self._accesses[key])
        return frequency / (1 + distance)

    def _victim(self) -> Key:
        if self.policy == "lru":
            return next(iter(self._entries))
        # min over entries in LRU order: the first of equal priorities is the least recently used
        return min(self._entries, key=self._priority)
