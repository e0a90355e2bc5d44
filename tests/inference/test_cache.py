"""ExpertCache: the byte budget always holds; LRU and frequency/layer-distance eviction on scripted sequences."""

from __future__ import annotations

import random

import pytest

from lightning_moe.inference.cache import ExpertCache


def test_cache_never_exceeds_its_byte_budget_on_a_random_sequence():
    rng = random.Random(0)
    for policy in ("lru", "freq_distance"):
        cache = ExpertCache(1000, policy, num_layers=4)
        for _ in range(2000):
            key = (rng.randrange(4), rng.randrange(8))
            cache.current_layer = key[0]
            if cache.get(key) is None:
                cache.put(key, object(), rng.randint(50, 400))
            assert cache.bytes <= 1000
        assert cache.peak_bytes <= 1000 and cache.evictions > 0


def test_lru_evicts_least_recently_used_on_a_scripted_sequence():
    cache = ExpertCache(30, "lru")
    for e in (0, 1, 2):
        cache.put((0, e), e, 10)
    cache.get((0, 0))  # order now 1, 2, 0
    assert cache.put((0, 3), 3, 10) == [(0, 1)]
    cache.get((0, 2))  # order 0, 3, 2
    assert cache.put((0, 4), 4, 20) == [(0, 0), (0, 3)]  # 20 bytes need two evictions
    assert cache.keys() == [(0, 2), (0, 4)]


def test_frequency_distance_evicts_lowest_frequency_over_distance():
    # 3 MoE layers; profiled frequencies; layer 1 is computing, so distances are
    # layer 2: 0, layer 0: 1, layer 1: 2  ->  priority = frequency / (1 + distance)
    freqs = {(0, 0): 0.6, (1, 0): 0.9, (2, 0): 0.2, (2, 1): 0.5}
    cache = ExpertCache(40, "freq_distance", num_layers=3, frequencies=freqs)
    for key in freqs:
        cache.put(key, key, 10)
    cache.current_layer = 1
    # priorities: (0,0) 0.6/2 = 0.30, (1,0) 0.9/3 = 0.30, (2,0) 0.2/1 = 0.20, (2,1) 0.5/1 = 0.50
    assert cache.put((2, 2), None, 10) == [(2, 0)]
    # (0,0) and (1,0) tie at 0.30: the least recently used, (0,0), goes first; (2,2) has frequency 0
    assert cache.put((0, 1), None, 10) == [(2, 2)]
    assert cache.put((0, 2), None, 20) == [(0, 1), (0, 0)]  # (0,1): frequency 0; then the tie's LRU
    cache.current_layer = 0  # now layer 1 is next (distance 0): (1,0) 0.9 beats (2,1) 0.5/2
    assert cache.put((0, 3), None, 10) == [(0, 2)]  # (0,2) frequency 0 at distance 2


def test_running_access_counts_are_the_frequency_without_a_profile():
    cache = ExpertCache(20, "freq_distance", num_layers=1)
    cache.put((0, 0), None, 10)
    cache.put((0, 1), None, 10)
    for _ in range(3):
        cache.get((0, 1))
    cache.get((0, 0))  # (0,0) is the most recent, but used once against three times
    assert cache.put((0, 2), None, 10) == [(0, 0)]


def test_an_entry_larger_than_the_budget_is_refused():
    with pytest.raises(ValueError, match="more than the whole cache budget"):
        ExpertCache(10).put((0, 0), None, 11)
    with pytest.raises(ValueError, match="cache policy"):
        ExpertCache(10, "fifo")
