"""Incremental detokenization and stop-string matching for one generated sequence.

Text grows token by token. Two things make that subtle:
  - a token may end in the middle of a multi-byte character, or change how the previous
    token decodes (merging pieces, a leading space): `tokenizers`' own `DecodeStream` handles
    both and yields a text chunk only once it is final;
  - a stop string may arrive split across tokens. The matcher searches only the region the
    new text could complete, and streaming holds back the last `max(len(stop)) - 1`
    characters, so a partial stop string is never emitted and then taken back.
"""

from __future__ import annotations

from typing import Any

from lmserve.sampling_params import SamplingParams

# Prompt tokens replayed into the decoder first, so the first generated token decodes with
# its real left context (a leading space, a merge with the prompt's last bytes).
_PREFILL_TOKENS = 6


class IncrementalDetokenizer:
    """Turns token ids into text, one step at a time. `output_text` is the whole text so far
    (stop string cut off once found); `get_delta()` returns what may be streamed now."""

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams):
        self.params = params
        self.output_text = ""
        self._num_streamed = 0  # characters of output_text already returned by get_delta()
        self._stops = params.stop
        self._hold_back = max((len(s) for s in self._stops), default=1) - 1
        self._decode = _make_decoder(tokenizer, prompt_token_ids, params)

    def update(self, new_token_ids: list[int]) -> str | None:
        """Decode new tokens; returns the stop string if one now appears (text is then cut)."""
        start = len(self.output_text)
        for token_id in new_token_ids:
            chunk = self._decode(token_id)
            if chunk:
                self.output_text += chunk
        if not self._stops or len(self.output_text) == start:
            return None
        return self._check_stop_strings(start)

    def _check_stop_strings(self, new_text_start: int) -> str | None:
        text = self.output_text
        for stop in self._stops:
            # A stop string found now must end inside the new text.
            pos = text.find(stop, max(new_text_start - len(stop) + 1, 0))
            if pos >= 0:
                end = pos + len(stop) if self.params.include_stop_str_in_output else pos
                self.output_text = text[:end]
                return stop
        return None

    def get_delta(self, finished: bool) -> str:
        """Text not yet streamed. While running, the tail that could still become a stop
        string is held back."""
        end = len(self.output_text) if finished else len(self.output_text) - self._hold_back
        if end <= self._num_streamed:
            return ""
        delta = self.output_text[self._num_streamed : end]
        self._num_streamed = end
        return delta


def _make_decoder(tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams):
    """A `token_id -> new text (or None)` function: tokenizers' DecodeStream for fast
    tokenizers, else decode-and-diff."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        try:
            from tokenizers.decoders import DecodeStream
        except ImportError:
            DecodeStream = None  # noqa: N806
        if DecodeStream is not None:
            stream = _prefilled_stream(DecodeStream, backend, prompt_token_ids, params)
            return lambda token_id: stream.step(backend, token_id)
    return _DiffDecoder(tokenizer, prompt_token_ids, params).step


def _prefilled_stream(DecodeStream, backend, prompt_token_ids, params):  # noqa: N803
    prefill = prompt_token_ids[-_PREFILL_TOKENS:]
    try:
        return DecodeStream(ids=prefill, skip_special_tokens=params.skip_special_tokens)
    except TypeError:  # older tokenizers: no prefill argument; replay the tokens instead
        stream = DecodeStream(skip_special_tokens=params.skip_special_tokens)
        for token_id in prefill:
            stream.step(backend, token_id)
        return stream


class _DiffDecoder:
    """Fallback for tokenizers without a fast backend: decode the tail and emit the growth,
    holding back text that ends in an incomplete character (U+FFFD)."""

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams):
        self.tokenizer = tokenizer
        self.params = params
        self.ids = list(prompt_token_ids[-_PREFILL_TOKENS:])
        self.prefix_len = len(self._decode(self.ids))
        self.emitted = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            ids,
            skip_special_tokens=self.params.skip_special_tokens,
            spaces_between_special_tokens=self.params.spaces_between_special_tokens,
        )

    def step(self, token_id: int) -> str | None:
        self.ids.append(token_id)
        text = self._decode(self.ids)[self.prefix_len :]
        if text.endswith("\ufffd"):
            return None
        delta, self.emitted = text[self.emitted :], len(text)
        return delta or None
