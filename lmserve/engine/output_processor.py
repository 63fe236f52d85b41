"""Front-end output processing: collect engine outputs per request, detokenize, match stop
strings, and assemble RequestOutputs (one per user request, n samples each)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lmserve.engine.messages import EngineCoreOutput
from lmserve.outputs import CompletionOutput, RequestOutput
from lmserve.sampling_params import SamplingParams


@dataclass
class _SampleState:
    """One engine request = one of the n samples of a user request."""

    parent: _ParentState
    index: int
    params: SamplingParams
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class _ParentState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    samples: list[_SampleState] = field(default_factory=list)
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples)


class OutputProcessor:
    def __init__(self, tokenizer: Any | None) -> None:
        self.tokenizer = tokenizer
        self._samples: dict[str, _SampleState] = {}  # engine request id -> sample

    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        child_ids_and_params: list[tuple[str, SamplingParams]],
    ) -> None:
        parent = _ParentState(request_id, prompt, prompt_token_ids)
        for index, (child_id, params) in enumerate(child_ids_and_params):
            sample = _SampleState(parent, index, params)
            parent.samples.append(sample)
            self._samples[child_id] = sample

    def has_unfinished_requests(self) -> bool:
        return bool(self._samples)

    def process_outputs(
        self, outputs: list[EngineCoreOutput]
    ) -> tuple[list[RequestOutput], list[str]]:
        """Returns (RequestOutputs of user requests that finished now, engine request ids to
        abort because a stop string ended them)."""
        finished: list[RequestOutput] = []
        to_abort: list[str] = []
        for out in outputs:
            sample = self._samples.get(out.request_id)
            if sample is None:
                continue
            sample.parent.num_cached_tokens = max(
                sample.parent.num_cached_tokens, out.num_cached_tokens
            )
            sample.token_ids.extend(out.new_token_ids)
            sample.finish_reason, sample.stop_reason = out.finish_reason, out.stop_reason
            if self._detokenize(sample) and out.finish_reason is None:
                to_abort.append(out.request_id)  # a stop string ended it; the engine must stop
            if sample.finish_reason is not None:
                del self._samples[out.request_id]
                if sample.parent.finished:
                    finished.append(_make_request_output(sample.parent))
        return finished, to_abort

    def _detokenize(self, sample: _SampleState) -> bool:
        """Update the sample's text; True when a stop string ended it now."""
        if self.tokenizer is None:
            return False
        params = sample.params
        text = self.tokenizer.decode(
            sample.token_ids, skip_special_tokens=params.skip_special_tokens
        )
        sample.text = text
        for stop in params.stop:
            pos = text.find(stop)
            if pos >= 0 and sample.finish_reason in (None, "stop", "length"):
                end = pos + len(stop) if params.include_stop_str_in_output else pos
                sample.text = text[:end]
                sample.finish_reason, sample.stop_reason = "stop", stop
                return True
        return False


def _make_request_output(parent: _ParentState) -> RequestOutput:
    return RequestOutput(
        request_id=parent.request_id,
        prompt=parent.prompt,
        prompt_token_ids=parent.prompt_token_ids,
        outputs=[
            CompletionOutput(
                index=s.index,
                text=s.text,
                token_ids=s.token_ids,
                finish_reason=s.finish_reason,
                stop_reason=s.stop_reason,
            )
            for s in parent.samples
        ],
        finished=True,
        num_cached_tokens=parent.num_cached_tokens,
    )
