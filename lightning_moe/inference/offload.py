"""Offloaded execution: non-expert weights resident, experts read from an `ExpertStore` on demand.

`offload(model, store, ...)` swaps every `SparseMoE` of a resident model for an
`OffloadedSparseMoE` that keeps the router (and everything about routing and dispatch) of
`SparseMoE` and overrides only `expert_weights`: it asks the `ExpertOffloader` for the experts
that received tokens and returns a stack of just those, so the layer's dispatch runs unchanged
on a smaller expert dimension. `load_offloaded(store)` builds the model from the store alone.

The offloader, per MoE layer call:
 1. looks up each needed expert in the `ExpertCache` (hit), else waits for a prefetch already
    loading it (prefetch hit, late), else reads it from the store now (miss, on demand);
 2. with prefetch on, predicts the next MoE layer's experts (transition table or lookahead
    through the next router) and queues the ones not cached on a background thread, which loads
    them into the cache while this layer computes;
 3. hands the dispatch dense weights: one float expert in place (a view, no copy), several
    copied (and packed ones dequantised) into one reused stack buffer.
By default the cache holds experts as stored (quantised experts stay packed), so a byte budget
holds more low-bit experts but every use dequantises; `dequantize_on_load=True` caches them
dense. File bytes and dequantised weights live in reused buffers (`BufferPool`). Inference only
(stack buffers are reused from layer to layer). Counters (`OffloadStats`): hits, misses,
prefetches issued and used, guesses and right guesses, bytes read, seconds loading and seconds the
decoding thread waited, evictions, peak expert bytes in memory.
"""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..layers import SparseMoE
from ..models import MultimodalLM
from .cache import ExpertCache
from .prefetch import ExpertPredictor, RoutingProfile
from .quantize import FLOAT_BITS, QuantizedTensor, dequantize
from .store import ExpertStore, ExpertTensors, expert_layers, model_from_store

__all__ = ["OffloadedSparseMoE", "ExpertOffloader", "BufferPool", "OffloadStats", "offload", "load_offloaded", "resident_bytes"]

Key = tuple[int, int]
PREDICTIONS = ("table", "lookahead")


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


def resident_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (shared tensors counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _tensor_bytes(t: Tensor | QuantizedTensor | None) -> int:
    if t is None:
        return 0
    return t.nbytes if isinstance(t, QuantizedTensor) else t.numel() * t.element_size()


class BufferPool:
    """Byte buffers handed out again after use, so expert loads reuse memory instead of allocating it.

    Without it every load allocates expert-sized tensors: fresh pages are faulted in (about the
    cost of a copy), and memory freed from the prefetch thread's malloc arena mostly stays with
    the process (measured on the benchmark's EdgeMoE configuration: about 450 MiB of resident set
    beyond the expert bytes held). Buffers are keyed by size (a store has a few). A buffer given
    back with `retire` may still be read by the layer computing now, so it becomes free only at
    the next `advance` (the offloader calls it when the next MoE layer call starts, after the
    previous layer's compute), and only once every background job that started before it was
    retired has ended (`begin_job` / `end_job`: the prefetch thread may still be reading a cached
    expert that the decoding thread evicts). `release` frees at once. Free buffers beyond
    `max_free_bytes` are dropped to the allocator.
    """

    def __init__(self, max_free_bytes: int) -> None:
        self.max_free_bytes = max_free_bytes
        self._free: dict[int, list[Tensor]] = {}
        self._retired: list[tuple[int, Tensor]] = []  # (epoch retired, buffer)
        self._epoch = 0
        self._jobs: dict[int, int] = {}  # running background job -> epoch it started in
        self._next_job = 0
        self.free_bytes = 0
        self.retired_bytes = 0
        self._lock = threading.Lock()

    @property
    def held_bytes(self) -> int:
        return self.free_bytes + self.retired_bytes

    GRANULE = 1 << 16  # sizes above 1 MiB round up to this: expert files differ by a few header bytes
    SMALL_GRANULE = 1 << 12  # smaller ones to a page, so tiny experts are not inflated

    def take(self, nbytes: int) -> Tensor:
        """A uint8 buffer of at least `nbytes` (reused if one of its size class is free, else new)."""
        granule = self.GRANULE if nbytes > 1 << 20 else self.SMALL_GRANULE
        size = -(-nbytes // granule) * granule
        with self._lock:
            free = self._free.get(size)
            if free:
                self.free_bytes -= size
                return free.pop()
        return torch.empty(size, dtype=torch.uint8)

    def _add_free(self, buffer: Tensor) -> None:
        if self.free_bytes + buffer.numel() <= self.max_free_bytes:
            self._free.setdefault(buffer.numel(), []).append(buffer)
            self.free_bytes += buffer.numel()

    def release(self, buffers: tuple[Tensor, ...]) -> None:
        """Buffers nothing reads any more: free now."""
        with self._lock:
            for buffer in buffers:
                self._add_free(buffer)

    def retire(self, buffers: tuple[Tensor, ...]) -> None:
        """Buffers the layer computing now may still read: free from the next `advance` on."""
        with self._lock:
            for buffer in buffers:
                self._retired.append((self._epoch, buffer))
                self.retired_bytes += buffer.numel()

    def begin_job(self) -> int:
        """A background job starts (it may read buffers that get retired while it runs); returns its token."""
        with self._lock:
            token, self._next_job = self._next_job, self._next_job + 1
            self._jobs[token] = self._epoch
            return token

    def end_job(self, token: int) -> None:
        with self._lock:
            del self._jobs[token]

    def advance(self) -> None:
        """A new MoE layer call starts: what was retired before it is no longer read by the layers;
        it is free unless a background job that started no later than its retirement still runs."""
        with self._lock:
            self._epoch += 1
            oldest_job = min(self._jobs.values(), default=self._epoch)
            still_read = []
            for retired_at, buffer in self._retired:
                if retired_at < oldest_job:
                    self.retired_bytes -= buffer.numel()
                    self._add_free(buffer)
                else:
                    still_read.append((retired_at, buffer))
            self._retired = still_read


class ExpertOffloader:
    """Serves expert weights to `OffloadedSparseMoE` layers from a store through a cache.

    budget_bytes: cache budget; None = no cache (every needed expert is read on demand).
    policy: 'lru' or 'freq_distance' (cache.py). profile: routing statistics, used for the
    frequency of `freq_distance` and, with prefetch=True and prediction='table', for next-layer
    prediction.
    prediction: how prefetch guesses the next MoE layer's experts. 'table' (EdgeMoE): from the
        experts chosen in this layer, through the profile's transition counts
        (prefetch.ExpertPredictor). 'lookahead' (mixtral-offloading's speculative loading,
        Pre-gated MoE): the next layer's own router applied to this layer's input; the residual
        stream changes little from one layer to the next, so this often picks the experts the next
        layer will choose. Needs no profile; the first MoE layer of the next token, whose input is
        not known yet, gets no prefetch.
    prefetch_width: experts predicted per layer (default: the layer's top_k);
    prefetch_min_probability: skip table guesses less likely than this (prefetch.ExpertPredictor).
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
        policy: str = "lru",
        profile: RoutingProfile | None = None,
        prefetch: bool = False,
        prediction: str = "table",
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
        if prefetch and prediction == "table" and profile is None:
            raise ValueError("prefetch with prediction='table' needs a routing profile (or use prediction='lookahead')")
        self.prefetching, self.prediction = prefetch, prediction
        self.prefetch_width = prefetch_width or store.layers[0]["top_k"]
        self.predictor = None
        if prefetch and prediction == "table":
            self.predictor = ExpertPredictor(profile, self.prefetch_width, prefetch_min_probability)
        self.routers: dict[int, nn.Module] = {}  # MoE layer -> its router (set by OffloadedSparseMoE), for lookahead
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
                    self._staged_bytes += sum(_tensor_bytes(t) for t in dense)
                    self._track(0)
        finally:
            with self._lock:
                self._in_flight -= in_flight
                self._pending.pop(key, None)
            self._pool.end_job(job)

    @torch.no_grad()
    def lookahead(self, layer: int, hidden: Tensor) -> list[int]:
        """The experts MoE layer `layer`'s router would pick for `hidden` (T, H): the highest summed
        routing probability over the tokens first, at most prefetch_width, only experts some token picks."""
        routing = self.routers[layer](hidden)
        score = routing.probs.sum(0)  # (E,)
        picked = torch.zeros_like(score, dtype=torch.bool)
        picked[routing.indices.reshape(-1)] = True
        score = score.masked_fill(~picked, -1.0)
        top = torch.topk(score, min(self.prefetch_width, int(picked.sum())))
        return top.indices.tolist()

    def score_guesses(self, layer: int, chosen: list[int]) -> None:
        """Count how many of the experts guessed for this layer call it then chose (prediction precision)."""
        guessed = self._guesses.pop(layer, None)
        if guessed is not None:
            with self._lock:
                self.stats.guesses += len(guessed)
                self.stats.guesses_right += len(guessed & set(chosen))

    def predict(self, layer: int, chosen: list[int], hidden: Tensor | None) -> list[int]:
        """Guesses for MoE layer `layer`, given the experts `chosen` in layer - 1 and that layer's input `hidden`."""
        if self.prediction == "lookahead":
            return [] if layer == 0 or hidden is None else self.lookahead(layer, hidden)
        return self.predictor.predict(layer, chosen if layer > 0 else None)

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
            guesses = self.predict(nxt, chosen or experts, hidden)
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
            buffers = sum(_tensor_bytes(t) for pair in self._buffers.values() for t in pair)
        b_in = b_down = None
        if first.b_in is not None:
            b_in = torch.stack([t.b_in for t in loaded]).to(self.dtype)
            b_down = torch.stack([t.b_down for t in loaded]).to(self.dtype)
        # experts read on demand without a cache are held only for this call: count them as working memory
        uncached = 0 if self.cache is not None else sum(t.nbytes for t in loaded)
        with self._lock:
            self._track(buffers + _tensor_bytes(b_in) + _tensor_bytes(b_down) + uncached)
            # staged weights of this layer used now, or not chosen by this call (mispredicted): free them;
            # keep those a later group of the same call will use
            call = set(chosen or experts)
            done = [k for k in self._staged
                    if k[0] == layer and k not in self._pending and (k[1] in experts or k[1] not in call)]
            for key in done:
                self._staged_bytes -= sum(_tensor_bytes(t) for t in self._staged.pop(key))
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


class OffloadedSparseMoE(SparseMoE):
    """A SparseMoE whose experts live in an ExpertStore (served by an ExpertOffloader).

    Shares the router module and every routing/dispatch setting of the layer it replaces; holds
    no expert parameters.
    """

    def __init__(self, moe: SparseMoE, layer_index: int, offloader: ExpertOffloader) -> None:
        nn.Module.__init__(self)  # not SparseMoE.__init__: that would allocate all experts
        for name in ("hidden_size", "intermediate_size", "num_experts", "top_k", "gated", "capacity_factor",
                     "eval_capacity_factor", "min_capacity"):
            setattr(self, name, getattr(moe, name))
        self.router, self.act_fn = moe.router, moe.act_fn
        # a shared expert (Qwen2-MoE) sees every token: resident, like the router (not in the store)
        self.shared_expert, self.shared_expert_gate = moe.shared_expert, moe.shared_expert_gate
        self.layer_index, self.offloader = layer_index, offloader
        offloader.routers[layer_index] = self.router
        self._call: tuple[Tensor, list[int]] | None = None  # this call's input and experts, for prediction
        self.last_routing = None
        self.train(moe.training)

    def _experts(self, flat: Tensor, indices: Tensor, weights: Tensor, dropped: Tensor | None) -> Tensor:
        # A prefill may route to every expert of the layer; with max_working_experts set, the
        # experts are brought in groups of that many (the pairs of other groups marked dropped,
        # so SparseMoE's dispatch skips them) and the group outputs summed, which bounds the dense
        # weights held at once. The summation order then differs from one pass (float rounding).
        if torch.is_grad_enabled() and flat.requires_grad:
            # the stacks are reused buffers and the experts are not parameters: nothing to train here
            raise RuntimeError("offloaded experts are for inference: run under torch.no_grad() (or freeze the model)")
        limit = self.offloader.max_working_experts
        used = torch.unique(indices if dropped is None else indices[~dropped]).tolist()
        self._call = (flat, used)  # predictions use the whole call's choice, also when experts come in groups
        if limit is None or len(used) <= limit:
            return super()._experts(flat, indices, weights, dropped)
        out = None
        for start in range(0, len(used), limit):
            outside = ~torch.isin(indices, torch.tensor(used[start : start + limit], device=indices.device))
            if dropped is not None:
                outside |= dropped
            part = super()._experts(flat, indices, weights, outside)  # (T, H)
            out = part if out is None else out + part
        return out

    def expert_weights(self, counts: list[int], sorted_expert: Tensor):
        used = [e for e, c in enumerate(counts) if c]
        hidden, chosen = self._call
        first_group = used[0] == chosen[0]  # predict the next layer once per call, after its first group
        w_in, w_down, b_in, b_down = self.offloader.expert_stack(self.layer_index, used, hidden, chosen, first_group)
        # renumber the sorted pairs' experts to positions in the stack (only biases index by expert)
        position = torch.full((self.num_experts + 1,), -1, dtype=torch.long, device=sorted_expert.device)
        position[used] = torch.arange(len(used), device=sorted_expert.device)
        return w_in, w_down, b_in, b_down, [counts[e] for e in used], position[sorted_expert]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, offloaded MoE layer {self.layer_index}"


def _swap_layers(model: nn.Module, offloader: ExpertOffloader) -> None:
    for index, (name, moe) in enumerate(expert_layers(model)):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, OffloadedSparseMoE(moe, index, offloader))


def offload(model: MultimodalLM, store: ExpertStore | str | Path, **offloader_kwargs) -> ExpertOffloader:
    """Swap the model's SparseMoE layers (in place) for offloaded ones served from `store`.

    Raises StoreError if the store was exported from another model. Keyword arguments go to
    `ExpertOffloader` (budget_bytes, policy, profile, prefetch, prediction, prefetch_width, ...).
    """
    store = store if isinstance(store, ExpertStore) else ExpertStore(Path(store))
    if any(isinstance(m, OffloadedSparseMoE) for m in model.modules()):
        raise ValueError("the model is already offloaded")
    devices = {p.device.type for p in model.parameters()}
    if devices != {"cpu"}:
        # experts are read from storage into CPU tensors; EdgeMoE targets CPU-resident inference
        raise ValueError(f"offloading serves experts on the CPU; the model is on {sorted(devices)} (move it to cpu)")
    store.check_model(model)
    offloader = ExpertOffloader(store, **offloader_kwargs)
    _swap_layers(model, offloader)
    return offloader


def load_offloaded(store: ExpertStore | str | Path, **offloader_kwargs) -> tuple[MultimodalLM, ExpertOffloader]:
    """Build the model from a store alone: resident weights from base.safetensors, experts offloaded.

    The expert weights are never allocated (the model is built on the meta device and only the
    resident part gets memory), so this peaks at the resident weights, not the whole model.
    """
    store = store if isinstance(store, ExpertStore) else ExpertStore(Path(store))
    offloader = ExpertOffloader(store, **offloader_kwargs)
    model = model_from_store(store, replace_experts=lambda m: _swap_layers(m, offloader))
    model.requires_grad_(False)
    return model, offloader
