"""Front-end output processing: engine outputs → detokenized, stop-checked RequestOutputs.

One user request has n samples; each sample is one engine request. Per step, a request yields
an update according to its `output_kind`: everything so far (CUMULATIVE), only what is new
(DELTA, for streaming) or one final output (FINAL_ONLY).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lmserve.core.messages import EngineCoreOutput, LogprobsLists
from lmserve.engine.detokenizer import IncrementalDetokenizer
from lmserve.outputs import CompletionOutput, Logprob, PromptLogprobs, RequestOutput
from lmserve.sampling_params import RequestOutputKind, SamplingParams


@dataclass
class _SampleState:
    """One engine request = one of the n samples of a user request."""

    parent: _ParentState
    index: int
    params: SamplingParams
    detokenizer: IncrementalDetokenizer | None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_tokens_sent: int = 0  # for DELTA outputs
    num_logprobs_sent: int = 0

    @property
    def text(self) -> str:
        return self.detokenizer.output_text if self.detokenizer else ""


@dataclass
class _ParentState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    output_kind: RequestOutputKind
    samples: list[_SampleState] = field(default_factory=list)
    num_cached_tokens: int = 0
    prompt_logprobs: PromptLogprobs | None = None
    prompt_logprobs_sent: bool = False

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
        params0 = child_ids_and_params[0][1]
        parent = _ParentState(request_id, prompt, prompt_token_ids, params0.output_kind)
        if params0.prompt_logprobs is not None:
            parent.prompt_logprobs = [None]  # the first prompt token has no logprob
        for index, (child_id, params) in enumerate(child_ids_and_params):
            detokenizer = (
                IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params)
                if self.tokenizer is not None
                else None
            )
            sample = _SampleState(parent, index, params, detokenizer)
            if params.logprobs is not None:
                sample.logprobs, sample.cumulative_logprob = [], 0.0
            parent.samples.append(sample)
            self._samples[child_id] = sample

    def has_unfinished_requests(self) -> bool:
        return bool(self._samples)

    def get_num_unfinished_requests(self) -> int:
        return len({id(s.parent) for s in self._samples.values()})

    def abort_requests(self, request_ids: list[str]) -> list[str]:
        """Forget the given user requests; returns their engine request ids."""
        wanted = set(request_ids)
        engine_ids = [k for k, s in self._samples.items() if s.parent.request_id in wanted]
        for engine_id in engine_ids:
            del self._samples[engine_id]
        return engine_ids

    def process_outputs(
        self, outputs: list[EngineCoreOutput]
    ) -> tuple[list[RequestOutput], list[str]]:
        """Returns (the RequestOutputs this step produces, engine request ids to abort in the
        engine because a stop string ended them)."""
        updated: dict[int, _ParentState] = {}
        to_abort: list[str] = []
        for out in outputs:
            sample = self._samples.get(out.request_id)
            if sample is None:
                continue
            parent = sample.parent
            parent.num_cached_tokens = max(parent.num_cached_tokens, out.num_cached_tokens)
            if out.new_prompt_logprobs is not None and parent.prompt_logprobs is not None:
                self._append_prompt_logprobs(parent, out.new_prompt_logprobs)
            if self._apply(sample, out):
                to_abort.append(out.request_id)
            if sample.finish_reason is not None:
                del self._samples[out.request_id]
            updated[id(parent)] = parent
        results = [r for p in updated.values() if (r := self._make_output(p)) is not None]
        return results, to_abort

    def _apply(self, sample: _SampleState, out: EngineCoreOutput) -> bool:
        """Add one engine output to a sample; True when a stop string ended it here."""
        sample.token_ids.extend(out.new_token_ids)
        if out.new_logprobs is not None and sample.logprobs is not None:
            self._append_sample_logprobs(sample, out.new_logprobs)
        sample.finish_reason, sample.stop_reason = out.finish_reason, out.stop_reason
        if sample.detokenizer is None:
            return False
        stop = sample.detokenizer.update(out.new_token_ids)
        if stop is None:
            return False
        stopped_by_engine_now = out.finish_reason is not None
        sample.finish_reason, sample.stop_reason = "stop", stop
        return not stopped_by_engine_now

    def _append_sample_logprobs(self, sample: _SampleState, lp: LogprobsLists) -> None:
        num = sample.params.logprobs
        for row_ids, row_lps, rank in zip(*_as_lists(lp)):
            sample.logprobs.append(self._logprob_dict(row_ids, row_lps, rank, num))
            sample.cumulative_logprob += row_lps[0]

    def _append_prompt_logprobs(self, parent: _ParentState, lp: LogprobsLists) -> None:
        num = parent.samples[0].params.prompt_logprobs
        for row_ids, row_lps, rank in zip(*_as_lists(lp)):
            parent.prompt_logprobs.append(self._logprob_dict(row_ids, row_lps, rank, num))

    def _logprob_dict(
        self, token_ids: list[int], logprobs: list[float], rank: int, num: int
    ) -> dict[int, Logprob]:
        """Column 0 (the actual token, with its rank) plus the top `num` tokens."""
        result = {token_ids[0]: Logprob(logprobs[0], rank, self._decode_one(token_ids[0]))}
        for i in range(1, num + 1):
            if token_ids[i] not in result:
                result[token_ids[i]] = Logprob(logprobs[i], i, self._decode_one(token_ids[i]))
        return result

    def _decode_one(self, token_id: int) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode([token_id])

    def _make_output(self, parent: _ParentState) -> RequestOutput | None:
        finished = parent.finished
        kind = parent.output_kind
        if kind == RequestOutputKind.FINAL_ONLY and not finished:
            return None
        delta = kind == RequestOutputKind.DELTA
        completions = [self._completion(s, delta) for s in parent.samples]
        prompt_logprobs = parent.prompt_logprobs
        if delta and parent.prompt_logprobs_sent:
            prompt_logprobs = None
        parent.prompt_logprobs_sent = True
        return RequestOutput(
            request_id=parent.request_id,
            prompt=parent.prompt,
            prompt_token_ids=parent.prompt_token_ids,
            outputs=completions,
            finished=finished,
            prompt_logprobs=prompt_logprobs,
            num_cached_tokens=parent.num_cached_tokens,
        )

    def _completion(self, sample: _SampleState, delta: bool) -> CompletionOutput:
        finished = sample.finish_reason is not None
        if delta:
            text = sample.detokenizer.get_delta(finished) if sample.detokenizer else ""
            token_ids = sample.token_ids[sample.num_tokens_sent :]
            logprobs = None
            if sample.logprobs is not None:
                logprobs = sample.logprobs[sample.num_logprobs_sent :]
                sample.num_logprobs_sent = len(sample.logprobs)
            sample.num_tokens_sent = len(sample.token_ids)
        else:
            text, token_ids, logprobs = sample.text, list(sample.token_ids), sample.logprobs
        return CompletionOutput(
            index=sample.index,
            text=text,
            token_ids=token_ids,
            cumulative_logprob=sample.cumulative_logprob,
            logprobs=logprobs,
            finish_reason=sample.finish_reason,
            stop_reason=sample.stop_reason,
        )


def _as_lists(lp: LogprobsLists) -> tuple[list, list, list]:
    """(token ids, logprobs, ranks) as Python lists, whether they came as arrays or lists."""
    return tuple(
        x.tolist() if hasattr(x, "tolist") else x for x in (lp.token_ids, lp.logprobs, lp.ranks)
    )
