"""The worker side of images: the encoder cache's tensors, and a step's input embeddings with
image rows in place.

    execute_encoder(): drop evicted entries; encode the step's new images (one batch) and
                       keep each output by content hash: cache[identifier] = [tokens, hidden]
    gather():          for each scheduled request whose computed range [start, start + q)
                       overlaps an image's placeholders, (flat token indices, encoder rows)
    merge():           embed(input_ids), then those rows overwritten with the image rows

The scheduler decides what is cached and when it is evicted (lmserve/core/
encoder_cache_manager.py); a step never reads an entry the scheduler has not kept for it.
Only multimodal models have one; text steps never reach it.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from lmserve.core.messages import MultiModalFeature
from lmserve.core.sched_output import SchedulerOutput
from lmserve.worker.input_batch import FlatInputs, InputBatch

# (flat indices [n] int64, image rows [n, hidden_size]) to write into a step's embeddings.
ImageRows = tuple[torch.Tensor, torch.Tensor]


class EncoderRunner:
    def __init__(self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
        self.model = model
        self.device = device
        self.dtype = dtype
        self.cache: dict[str, torch.Tensor] = {}  # identifier -> [tokens, hidden_size]
        # Requests with images, until they finish: placeholders (offset, length, identifier).
        self.placeholders: dict[str, list[MultiModalFeature]] = {}

    def add_request(self, req_id: str, features: list[MultiModalFeature] | None) -> None:
        if features:
            self.placeholders[req_id] = features

    def remove_request(self, req_id: str) -> None:
        self.placeholders.pop(req_id, None)

    @property
    def has_work(self) -> bool:
        return bool(self.placeholders)

    def execute_encoder(self, scheduler_output: SchedulerOutput) -> float:
        """Apply the step's evictions and encode its new images; returns the encoder's
        seconds (host time; on CUDA the encoder's kernels are waited for)."""
        for identifier in scheduler_output.free_encoder_mm_hashes:
            self.cache.pop(identifier, None)
        features = scheduler_output.scheduled_encoder_inputs
        if not features:
            return 0.0
        start = time.perf_counter()
        pixels = np.stack([f.pixel_values for f in features])  # [n, channels, height, width]
        pixel_values = torch.from_numpy(pixels).to(self.device, self.dtype, non_blocking=True)
        embeds = self.model.embed_images(pixel_values)  # [n, tokens, hidden_size]
        for feature, rows in zip(features, embeds):
            if rows.shape[0] != feature.length:
                raise ValueError(
                    f"image {feature.identifier[:12]}: the encoder gave {rows.shape[0]} rows "
                    f"for {feature.length} placeholder tokens"
                )
            self.cache[feature.identifier] = rows
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        return time.perf_counter() - start

    def gather(self, flat: FlatInputs, batch: InputBatch) -> ImageRows | None:
        """The image rows this step's tokens read, or None when no scheduled token is an
        image placeholder."""
        dst: list[np.ndarray] = []
        rows: list[torch.Tensor] = []
        starts = flat.query_start_loc
        for i, row in enumerate(flat.req_rows.tolist()):
            features = self.placeholders.get(batch.req_ids[row])
            if features is None:
                continue
            first = int(flat.positions[starts[i]])  # position of the request's first token
            end = first + int(starts[i + 1] - starts[i])
            for f in features:
                lo, hi = max(f.offset, first), min(f.end, end)
                if lo >= hi:
                    continue
                dst.append(np.arange(lo, hi) - first + int(starts[i]))
                rows.append(self.cache[f.identifier][lo - f.offset : hi - f.offset])
        if not rows:
            return None
        index = torch.from_numpy(np.concatenate(dst)).to(self.device, non_blocking=True)
        return index, torch.cat(rows)

    def merge(self, input_ids: torch.Tensor, image_rows: ImageRows) -> torch.Tensor:
        """[num_tokens] ids -> [num_tokens, hidden_size] embeddings, image rows in place."""
        embeds = self.model.embed_input_ids(input_ids)  # [num_tokens, hidden_size]
        index, rows = image_rows
        return embeds.index_copy(0, index, rows.to(embeds.dtype))
