"""The encoder cache's bookkeeping (scheduler side), after vLLM V1's EncoderCacheManager.

An image's encoder output (one embedding row per placeholder token) is computed once and kept
on the worker, keyed by the image's content hash, until every request using it has consumed
it: requests may share it (the same image in several prompts) and chunked prefill may read it
over several steps. The scheduler owns the accounting; the worker owns the tensors and drops
the ones named in `SchedulerOutput.free_encoder_mm_hashes`.

    cached:   hash -> ids of the requests still to consume it (ref count = len)
    freeable: hashes nobody references any more, oldest first; still hittable, and evicted
              (reported to the worker) only when a new entry needs their slots

Sizes count embedding rows ("slots"): `cache_size` rows in all.
"""

from __future__ import annotations

from collections import OrderedDict

from lmserve.core.messages import EncoderStats, MultiModalFeature
from lmserve.request import Request


class EncoderCacheManager:
    def __init__(self, cache_size: int) -> None:
        self.cache_size = cache_size
        self.num_free_slots = cache_size  # slots of no entry at all
        self.num_freeable_slots = cache_size  # free slots + slots of unreferenced entries
        self.cached: dict[str, set[str]] = {}  # hash -> request ids referencing it
        self.sizes: dict[str, int] = {}  # hash -> slots it holds
        self.freeable: OrderedDict[str, int] = OrderedDict()  # hash -> slots, eviction order
        self.freed: list[str] = []  # evicted since the last take_freed(): tell the worker
        self.queries = self.hits = 0  # images looked up when first needed / found cached

    def check_and_update_cache(self, request: Request, index: int) -> bool:
        """Is image `index` of `request` cached? If so the request now references it (and it
        is no longer evictable)."""
        feature = request.mm_features[index]
        refs = self.cached.get(feature.identifier)
        if refs is None:
            return False
        if not refs:  # unreferenced until now: take it off the eviction list
            self.freeable.pop(feature.identifier)
            self.num_freeable_slots -= feature.length
        refs.add(request.request_id)
        return True

    def can_allocate(self, feature: MultiModalFeature, encoder_budget: int) -> bool:
        """Room for `feature`'s output within this step's encoder budget, evicting
        unreferenced entries (oldest first) if that makes room."""
        size = feature.length
        if size > encoder_budget or size > self.num_freeable_slots:
            return False
        while size > self.num_free_slots:
            identifier, freed = self.freeable.popitem(last=False)
            del self.cached[identifier], self.sizes[identifier]
            self.num_free_slots += freed
            self.freed.append(identifier)
        return True

    def allocate(self, request: Request, index: int) -> None:
        """Reserve room for image `index` of `request` (its encoder runs this step)."""
        feature = request.mm_features[index]
        self.cached[feature.identifier] = {request.request_id}
        self.sizes[feature.identifier] = feature.length
        self.num_free_slots -= feature.length
        self.num_freeable_slots -= feature.length

    def free_encoder_input(self, request: Request, index: int) -> None:
        """`request` no longer needs image `index` (consumed, finished or preempted). The
        entry stays cached, evictable once no request references it."""
        identifier = request.mm_features[index].identifier
        refs = self.cached.get(identifier)
        if refs is None or request.request_id not in refs:
            return
        refs.discard(request.request_id)
        if not refs:
            size = self.sizes[identifier]
            self.freeable[identifier] = size
            self.num_freeable_slots += size

    def free(self, request: Request) -> None:
        for index in range(len(request.mm_features)):
            self.free_encoder_input(request, index)

    def take_freed(self) -> list[str]:
        """Hashes evicted since the last call: the worker drops their tensors."""
        freed, self.freed = self.freed, []
        return freed

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_slots / self.cache_size if self.cache_size else 0.0

    def make_stats(self, last: tuple[int, int]) -> tuple[EncoderStats, tuple[int, int]]:
        """Gauges now and the counters' increments since `last` = (queries, hits)."""
        stats = EncoderStats(
            cache_usage=self.usage,
            cache_queries=self.queries - last[0],
            cache_hits=self.hits - last[1],
        )
        return stats, (self.queries, self.hits)


def schedule_encoder_inputs(
    request: Request,
    num_computed_tokens: int,
    num_new_tokens: int,
    encoder_budget: int,
    cache: EncoderCacheManager,
) -> tuple[list[int], int, int]:
    """Which images of `request` to encode for a step that computes tokens
    [num_computed_tokens, num_computed_tokens + num_new_tokens).

    Every image whose placeholders overlap that range must be in the encoder cache by the
    step's forward: a cached one is referenced, a missing one is encoded this step if the
    budget and the cache have room. Otherwise the step stops just before that image's first
    placeholder (which may leave nothing to schedule). Does not change the cache.

    Returns (image indices to encode, num_new_tokens, encoder budget left). The caller
    commits with `commit_encoder_inputs` once the request is really scheduled."""
    end = num_computed_tokens + num_new_tokens
    to_encode: list[int] = []
    for index, feature in enumerate(request.mm_features):
        if feature.offset >= end:
            break  # not reached this step (features are in prompt order)
        if feature.end <= num_computed_tokens:
            continue  # already consumed
        if feature.identifier in cache.cached or any(
            request.mm_features[i].identifier == feature.identifier for i in to_encode
        ):
            continue  # cached (or encoded this step for an earlier copy of the image)
        if not cache.can_allocate(feature, encoder_budget):
            num_new_tokens = feature.offset - num_computed_tokens
            break
        encoder_budget -= feature.length
        to_encode.append(index)
    return to_encode, max(num_new_tokens, 0), encoder_budget


def commit_encoder_inputs(
    request: Request,
    num_computed_tokens: int,
    num_new_tokens: int,
    to_encode: list[int],
    cache: EncoderCacheManager,
) -> None:
    """The step computes tokens [num_computed_tokens, +num_new_tokens) of `request`: reference
    (or reserve) every image they read, counting lookups and hits."""
    end = num_computed_tokens + num_new_tokens
    for index, feature in enumerate(request.mm_features):
        if feature.offset >= end:
            break
        if feature.end <= num_computed_tokens:
            continue
        if request.request_id in cache.cached.get(feature.identifier, ()):
            continue  # referenced in an earlier step (chunked prefill)
        cache.queries += 1
        if cache.check_and_update_cache(request, index):
            cache.hits += index not in to_encode  # a copy encoded earlier in this step
        else:
            cache.allocate(request, index)
