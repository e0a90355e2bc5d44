"""`ExpertOffloader`: serves expert weights to the offloaded layers from a store, through a cache and prefetch.

Per MoE layer call (`expert_stack`), the offloader:
 1. looks up each needed expert in the `ExpertCache` (hit), else waits for a prefetch already
    loading it (prefetch hit, late), else reads it from the store now (miss, on demand);
 2. with prefetch on, asks its `Predictor` (predictors.py: transition table or lookahead through
    the next router) for the next MoE layer's experts and queues the ones not cached on a
    background thread, which loads them into the cache while this layer computes;
 3. hands the dispatch dense weights: one float expert in place (a view, no copy), several
    copied (and packed ones dequantised) into one reused stack buffer.
By default the cache holds experts as stored (quantised experts stay packed), so a byte budget
holds more low-bit experts but every use dequantises; `dequantize_on_load=True` caches them
dense. File bytes and dequantised weights live in reused buffers (memory.BufferPool). Inference
only (stack buffers are reused from layer to layer). Counters (`OffloadStats`): hits, misses,
prefetches issued and used, guesses and right guesses, bytes read, seconds loading and seconds the
decoding thread waited, evictions, peak expert bytes in memory.
"""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from .cache import CachePolicy, ExpertCache
from .memory import BufferPool, tensor_bytes
from .predictors import PREDICTIONS, Prediction, Predictor, build_predictor
from .profiling import RoutingProfile
from .quantize import FLOAT_BITS, QuantizedTensor, dequantize
from .store import ExpertStore, ExpertTensors

__all__ = ["ExpertOffloader", "OffloadStats"]

Key = tuple[int, int]  # (MoE layer, expert)


@dataclass
class OffloadStats:
    hits: int = 0  # needed experts found in the cache
    misses: int = 0  # needed experts read on demand
    prefetch_issued: int = 0  # experts queued for background loading
    prefetch_hits: int = 0  # needed experts that a prefetch had loaded (or was loading)
    staged_hits: int = 0  # quantised experts the prefetch thread had already dequantised
    bytes_read: int = 0  # bytes read from the store (on demand + prefetch)
    load_seconds: float = 0.0  # time spent reading + decoding expert files, both threads
    wait_seconds: float = 0.0  # time the decoding thread was blocked on expert loads
    evictions: int = 0
    peak_expert_bytes: int = 0  # peak bytes of expert weights in memory (cache + in flight + working stack)
    guesses: int = 0  # experts predicted for a layer call (cached or not)
    guesses_right: int = 0  # predicted experts the layer call then chose

    @property
    def prediction_precision(self) -> float:
        return self.guesses_right / max(self.guesses, 1)

    @property
    def hit_rate(self) -> float:
        return self.hits / max(self.hits + self.misses, 1)

    def as_dict(self) -> dict:
        return {**asdict(self), "hit_rate": self.hit_rate, "prediction_precision": self.prediction_precision}


class ExpertOffloader:
    """Serves expert weights to `OffloadedSparseMoE` layers from a store through a cache.

    budget_bytes: cache budget; None = no cache (every needed expert is read on demand).
    policy: 'lru' or 'freq_distance' (cache.py). profile: routing statistics, used for the
    frequency of `freq_distance` and, with prefetch=True and prediction='table', for next-layer
    prediction.
    prediction: how prefetch guesses the next MoE layer's experts (predictors.py): 'table'
        (EdgeMoE, `TransitionPredictor`): from the experts chosen in this layer, through the
        profile's transition counts; 'lookahead' (`LookaheadPredictor`): the next layer's own
        router applied to this layer's input (needs no profile).
    prefetch_width: experts predicted per layer (default: the layer's top_k);
    prefetch_min_probability: skip table guesses less likely than this (`TransitionPredictor`).
    dequantize_on_load: the cache holds dequantised (dense) experts, so a hit costs nothing more
        but the budget holds fewer quantised experts; default: the cache holds them packed and a
        use dequantises (predicted experts are dequantised ahead on the prefetch thread).
    max_working_experts: most experts a layer holds dense at once (prefill: see
        `OffloadedSparseMoE._experts`); None = all the experts routed in the call. Several experts
        are copied into one stack for the dispatch; a single dense expert is used in place, so 1
        avoids every copy of cached float experts (at the price of one dispatch per expert and a
        different float summation order than the in-memory layer's).
    """

    def __init__(
        self,
        store: ExpertStore,
        budget_bytes: int | None = None,
        policy: CachePolicy = "lru",
        profile: RoutingProfile | None = None,
        prefetch: bool = False,
        prediction: Prediction = "table",
        prefetch_width: int | None = None,
        prefetch_min_probability: float = 0.0,
        dequantize_on_load: bool = False,
        max_working_experts: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.store, self.dtype = store, dtype
        self.dequantize_on_load, self.max_working_experts = dequantize_on_load, max_working_experts
        if max_working_experts is not None and max_working_experts < 1:
            raise ValueError(f"max_working_experts must be at least 1, got {max_working_experts}")
        self.num_layers = len(store.layers)
        self.stats = OffloadStats()
        largest_dense = max(store.dense_expert_bytes(layer, dtype) for layer in range(self.num_layers))
        self._pool = BufferPool(max_free_bytes=2 * max(largest_dense, store.largest_expert_bytes))
        self.cache = None
        if budget_bytes is not None:
            largest = self._largest_cached_bytes()
            if budget_bytes < largest:
                raise ValueError(f"cache budget of {budget_bytes} bytes is smaller than the largest expert of "
                                 f"{store.directory} ({largest} bytes): no expert could be cached; raise the budget "
                                 f"to at least {largest} bytes or use no cache (budget None)")
            frequencies = profile.frequencies() if (profile is not None and policy == "freq_distance") else None
            self.cache = ExpertCache(budget_bytes, policy, self.num_layers, frequencies,
                                     on_evict=lambda key, tensors: self._pool.retire(tensors.buffers))
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        if prefetch and self.cache is None:
            raise ValueError("prefetch needs a cache budget (it loads into the cache)")
        self.prefetching, self.prediction = prefetch, prediction
        self.prefetch_width = prefetch_width or store.layers[0]["top_k"]
        self.routers: dict[int, nn.Module] = {}  # MoE layer -> its router (set by OffloadedSparseMoE), for lookahead
        self.predictor: Predictor | None = None
        if prefetch:  # build_predictor refuses 'table' without a profile
            self.predictor = build_predictor(prediction, self.prefetch_width, profile, self.routers,
                                             prefetch_min_probability)
        self._guesses: dict[int, set[int]] = {}  # MoE layer -> experts guessed for its next call
        self._lock = threading.Lock()
        self._pending: dict[Key, Future] = {}
        self._prefetched: set[Key] = set()  # loaded by a prefetch and not used yet
        self._in_flight = 0  # expert bytes loaded but not (yet) in the cache
        self._staged: dict[Key, tuple[Tensor, Tensor]] = {}  # quantised experts dequantised ahead of use
        self._staged_buffers: dict[Key, tuple[Tensor, ...]] = {}  # the pool buffers behind _staged
        self._staged_bytes = 0
        self._buffers: dict[tuple[int, int, int], tuple[Tensor, Tensor]] = {}  # (rows, H, I) -> stack buffers
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="expert-prefetch") if prefetch else None

    # ------------------------------------------------------------------ loading
    def _largest_cached_bytes(self) -> int:
        """The largest expert as the cache holds it (packed as stored, or dense float)."""
        if not self.dequantize_on_load:
            return self.store.largest_expert_bytes
        dense = max(self.store.dense_expert_bytes(layer, self.dtype) for layer in range(self.num_layers))
        return max(dense, self.store.largest_expert_bytes)

    def _dequantize(self, tensors: ExpertTensors) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, ...]]:
        """(w_in, w_down) of a quantised expert, dequantised into pool buffers, and those buffers."""
        dense, buffers = [], []
        for q in (tensors.w_in, tensors.w_down):
            nbytes = math.prod(q.shape) * self.dtype.itemsize
            buffer = self._pool.take(nbytes)
            dense.append(dequantize(q, self.dtype, out=buffer[:nbytes].view(self.dtype).view(q.shape)))
            buffers.append(buffer)
        return (dense[0], dense[1]), tuple(buffers)

    def _load(self, key: Key) -> ExpertTensors:
        start = time.perf_counter()
        tensors = self.store.read(*key, out=self._pool.take(self.store.entries[key].bytes))
        if self.dequantize_on_load and tensors.bits != FLOAT_BITS:
            (w_in, w_down), buffers = self._dequantize(tensors)
            b_in, b_down = (None if b is None else b.clone() for b in (tensors.b_in, tensors.b_down))
            self._pool.release(tensors.buffers)  # the file's bytes are not read again once dequantised
            tensors = ExpertTensors(w_in, w_down, b_in, b_down, FLOAT_BITS, buffers)
        elapsed = time.perf_counter() - start
        with self._lock:
            self.stats.load_seconds += elapsed
            self.stats.bytes_read += self.store.entries[key].bytes
        return tensors

    def _track(self, working: int) -> None:
        current = ((self.cache.bytes if self.cache is not None else 0) + self._in_flight + self._staged_bytes
                   + self._pool.held_bytes + working)
        self.stats.peak_expert_bytes = max(self.stats.peak_expert_bytes, current)

    def _cached_size(self, key: Key) -> int:
        """Bytes expert `key` takes in the cache (dense when quantised experts are dequantised on load)."""
        entry = self.store.entries[key]
        if self.dequantize_on_load and entry.bits != FLOAT_BITS:
            return self.store.dense_expert_bytes(key[0], self.dtype)
        return entry.memory_bytes

    def _background_prepare(self, key: Key) -> None:
        """Prefetch thread: load the expert into the cache unless cached, then stage it dequantised."""
        job = self._pool.begin_job()  # buffers this job reads are not reused until it ends
        in_flight = self._cached_size(key)
        try:
            with self._lock:
                tensors = self.cache.peek(key)
            if tensors is None:
                tensors = self._load(key)
                with self._lock:
                    self.stats.evictions += len(self.cache.put(key, tensors, tensors.nbytes))
                    self._in_flight -= in_flight  # counted by the cache from now on
                    in_flight = 0
                    self._prefetched.add(key)
                    self._track(0)
            if tensors.bits != FLOAT_BITS:
                # dequantise here, off the decoding thread, so the layer finds dense weights ready
                dense, buffers = self._dequantize(tensors)
                with self._lock:
                    self._staged[key], self._staged_buffers[key] = dense, buffers
                    self._staged_bytes += sum(tensor_bytes(t) for t in dense)
                    self._track(0)
        finally:
            with self._lock:
                self._in_flight -= in_flight
                self._pending.pop(key, None)
            self._pool.end_job(job)

    def score_guesses(self, layer: int, chosen: list[int]) -> None:
        """Count how many of the experts guessed for this layer call it then chose (prediction precision)."""
        guessed = self._guesses.pop(layer, None)
        if guessed is not None:
            with self._lock:
                self.stats.guesses += len(guessed)
                self.stats.guesses_right += len(guessed & set(chosen))

    def prefetch(self, layer: int, experts: list[int]) -> list[int]:
        """Queue the given experts of MoE layer `layer` that are not ready (cached and, if quantised, staged)."""
        queued = []
        for expert in experts:
            key = (layer, expert)
            with self._lock:
                # packed quantised experts are ready once dequantised ahead (staged), others once cached
                staged = self.store.entries[key].bits != FLOAT_BITS and not self.dequantize_on_load
                ready = key in self._staged if staged else key in self.cache
                if ready or key in self._pending:
                    continue
                self._in_flight += self._cached_size(key)
                self._pending[key] = self._executor.submit(self._background_prepare, key)
                self.stats.prefetch_issued += 1
            queued.append(expert)
        return queued

    def wait_prefetches(self) -> None:
        """Block until every queued prefetch has finished (scripted tests, end of generation)."""
        for future in list(self._pending.values()):
            future.result()

    def fetch(self, layer: int, experts: list[int]) -> list[ExpertTensors]:
        """The experts of MoE layer `layer`, from the cache, a finishing prefetch, or the store."""
        out = []
        for expert in experts:
            key = (layer, expert)
            with self._lock:
                if self.cache is not None:
                    self.cache.current_layer = layer
                tensors = self.cache.get(key) if self.cache is not None else None
                future = self._pending.get(key) if tensors is None else None
                if tensors is not None:
                    self.stats.hits += 1
                    if key in self._prefetched:
                        self.stats.prefetch_hits += 1
                        self._prefetched.discard(key)
            if tensors is None and future is not None:  # being prefetched: wait for it
                start = time.perf_counter()
                future.result()
                with self._lock:
                    self.stats.wait_seconds += time.perf_counter() - start
                    tensors = self.cache.get(key)
                    if tensors is not None:
                        self.stats.hits += 1
                        self.stats.prefetch_hits += 1
                        self._prefetched.discard(key)
            if tensors is None:  # miss: read it now
                start = time.perf_counter()
                tensors = self._load(key)
                with self._lock:
                    self.stats.wait_seconds += time.perf_counter() - start
                    self.stats.misses += 1
                    if self.cache is not None:
                        self.stats.evictions += len(self.cache.put(key, tensors, tensors.nbytes))
            out.append(tensors)
        return out

    def _stack_buffers(self, layer: int, n: int) -> tuple[Tensor, Tensor]:
        """(n, 2I or I, H) and (n, H, I) views of buffers reused across calls.

        Fresh allocations of this size are page-faulted on every call (measured: about twice the
        cost of a copy into memory already touched), so the stack lives in buffers that grow to
        the most experts a call has needed and are then reused. Inference only: the next layer
        overwrites what the previous one read, so nothing may keep these for a backward pass.
        """
        shapes = self.store.expert_shapes(layer)
        shape = (*shapes["w_in"], shapes["w_down"][1])  # (2I or I, H, I)
        buffers = self._buffers.get(shape)
        if buffers is None or buffers[0].shape[0] < n:
            buffers = (torch.empty(n, *shapes["w_in"], dtype=self.dtype), torch.empty(n, *shapes["w_down"], dtype=self.dtype))
            self._buffers[shape] = buffers
        return buffers[0][:n], buffers[1][:n]

    def expert_stack(self, layer: int, experts: list[int], hidden: Tensor | None = None,
                     chosen: list[int] | None = None, predict: bool = True,
                     ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """Stacked (len(experts), ...) dense weights of MoE layer `layer`, the shapes SparseMoE dispatches on.

        hidden: the layer's input (T, H), for lookahead prediction; chosen: every expert the layer
        call routes to (default `experts`; differs when the call brings its experts in groups);
        predict: guess and prefetch the next layer's experts after this fetch.
        """
        self._pool.advance()  # the previous layer call has computed: what it retired is free
        loaded = self.fetch(layer, experts)
        if self.prefetching and predict:
            self.score_guesses(layer, chosen or experts)
            # next MoE layer of this token, or the first layer of the next token after the last one
            nxt = (layer + 1) % self.num_layers
            guesses = self.predictor.predict(nxt, chosen or experts, hidden)
            self._guesses[nxt] = set(guesses)
            self.prefetch(nxt, guesses)
        first = loaded[0]
        with self._lock:
            staged = self._staged.get((layer, experts[0]))
        if len(loaded) == 1 and (staged is not None or not isinstance(first.w_in, QuantizedTensor)):
            # one dense expert: (1, N, K) views of the cached (or staged) weights, no copy at all
            if staged is not None:
                self.stats.staged_hits += 1
            w_in, w_down = staged if staged is not None else (first.w_in, first.w_down)
            w_in, w_down = w_in.to(self.dtype).unsqueeze(0), w_down.to(self.dtype).unsqueeze(0)
            buffers = 0
        else:
            w_in, w_down = self._stack(layer, experts, loaded)
            buffers = sum(tensor_bytes(t) for pair in self._buffers.values() for t in pair)
        b_in = b_down = None
        if first.b_in is not None:
            b_in = torch.stack([t.b_in for t in loaded]).to(self.dtype)
            b_down = torch.stack([t.b_down for t in loaded]).to(self.dtype)
        # experts read on demand without a cache are held only for this call: count them as working memory
        uncached = 0 if self.cache is not None else sum(t.nbytes for t in loaded)
        with self._lock:
            self._track(buffers + tensor_bytes(b_in) + tensor_bytes(b_down) + uncached)
            # staged weights of this layer used now, or not chosen by this call (mispredicted): free them;
            # keep those a later group of the same call will use
            call = set(chosen or experts)
            done = [k for k in self._staged
                    if k[0] == layer and k not in self._pending and (k[1] in experts or k[1] not in call)]
            for key in done:
                self._staged_bytes -= sum(tensor_bytes(t) for t in self._staged.pop(key))
                self._pool.retire(self._staged_buffers.pop(key))
        if self.cache is None:  # read for this call only: reusable once this layer has computed
            for tensors in loaded:
                self._pool.retire(tensors.buffers)
        return w_in, w_down, b_in, b_down

    def _stack(self, layer: int, experts: list[int], loaded: list[ExpertTensors]) -> tuple[Tensor, Tensor]:
        """Dense (E_used, ...) stacks of several experts in the reused buffers (dequantising packed ones)."""
        w_in, w_down = self._stack_buffers(layer, len(loaded))
        for i, (expert, t) in enumerate(zip(experts, loaded)):
            with self._lock:
                staged = self._staged.get((layer, expert))
            if staged is not None:
                self.stats.staged_hits += 1
            for j, (src, dst) in enumerate(((t.w_in, w_in[i]), (t.w_down, w_down[i]))):
                if staged is not None:
                    dst.copy_(staged[j])
                elif isinstance(src, QuantizedTensor):
                    dequantize(src, self.dtype, out=dst)
                else:
                    dst.copy_(src)
        return w_in, w_down

    def close(self) -> None:
        """Stop the prefetch thread; the offloaded model still works, loading on demand through the cache."""
        if self._executor is not None:
            self.wait_prefetches()
            self._executor.shutdown(wait=True)
            self._executor = None
        self.prefetching = False
