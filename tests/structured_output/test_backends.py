"""Both structured-output backends (xgrammar and guidance) behind the one interface
(lmserve/structured_output/backend.py), on the tiny tokenizer with logits wider than its
vocabulary, no model: masks cover the tokenizer's ids only; a request's own stop tokens (not
the tokenizer's EOS) are allowed exactly where the grammar may end and end it; a refused token
leaves the state as it was; validate_tokens changes nothing; rollback undoes tokens, a stop
token included; batched fills and accepts equal the one-row ones."""

from __future__ import annotations

import functools
import re

import numpy as np
import pytest

from lmserve.sampling_params import StructuredOutputsParams
from lmserve.structured_output.backend import num_accepted, num_bitmask_words

BACKENDS = ["xgrammar", "guidance"]
EOS_ID = 2  # the tiny tokenizer's </s>
STOP_ID = 5  # some other token, used as a request's stop token
LOGITS_WIDTH = 600  # a model padded beyond the tokenizer's 512 ids


@functools.cache
def tokenizer():
    from tests.tiny_models import make_tiny_tokenizer

    return make_tiny_tokenizer(512)


@functools.cache
def make_backend(name: str):
    if name == "guidance":
        from lmserve.structured_output.llguidance_backend import GuidanceBackend

        return GuidanceBackend(tokenizer(), LOGITS_WIDTH, num_fill_threads=2)
    from lmserve.structured_output.xgrammar_backend import XgrammarBackend

    return XgrammarBackend(tokenizer(), LOGITS_WIDTH, num_threads=1, num_fill_threads=2)


def encode(text: str) -> list[int]:
    return tokenizer().encode(text, add_special_tokens=False)


def matcher(backend: str, stop_ids: list[int], **constraint):
    backend_ = make_backend(backend)
    compiled = backend_.compile(StructuredOutputsParams(**constraint))
    return backend_, backend_.make_grammar(compiled, stop_ids)


def allowed(backend_, grammar) -> set[int]:
    bitmask = np.zeros((1, num_bitmask_words(backend_.vocab_size)), dtype=np.int32)
    backend_.batch_fill_bitmask([grammar], bitmask, [0])
    bits = np.unpackbits(bitmask.view(np.uint8), bitorder="little")
    return set(np.flatnonzero(bits).tolist())


@pytest.mark.parametrize("backend", BACKENDS)
def test_masks_cover_the_tokenizers_ids_only(backend):
    backend_ = make_backend(backend)
    assert backend_.vocab_size == 512
    _, grammar = matcher(backend, [EOS_ID], json_object=True)
    assert max(allowed(backend_, grammar)) < 512


@pytest.mark.parametrize("backend", BACKENDS)
def test_request_stop_tokens_are_allowed_where_the_grammar_may_end(backend):
    backend_, grammar = matcher(backend, [STOP_ID], regex=r"[0-9]{3}(-[0-9]{4})?")
    tokens = encode("123")
    assert STOP_ID not in allowed(backend_, grammar)
    assert grammar.accept_tokens(tokens[:-1]) or len(tokens) == 1
    assert not grammar.accept_tokens([STOP_ID])  # not yet: "12" is not complete
    grammar.rollback(len(tokens) - 1)
    assert grammar.accept_tokens(tokens)
    mask = allowed(backend_, grammar)
    assert STOP_ID in mask and EOS_ID not in mask  # the request's stop token, not the EOS
    assert not grammar.accept_tokens([EOS_ID]) and not grammar.is_terminated()
    assert grammar.accept_tokens([STOP_ID]) and grammar.is_terminated()
    assert not grammar.accept_tokens(encode("-"))  # nothing after a stop token
    grammar.rollback(1)  # the stop token
    assert not grammar.is_terminated()
    assert grammar.accept_tokens(encode("-4567") + [STOP_ID]) and grammar.is_terminated()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_complete_choice_allows_only_stop_tokens(backend):
    backend_, grammar = matcher(backend, [EOS_ID, STOP_ID], choice=["red", "green"])
    assert grammar.accept_tokens(encode("red"))
    assert allowed(backend_, grammar) == {EOS_ID, STOP_ID}


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_refused_token_leaves_the_state_as_it_was(backend):
    backend_, grammar = matcher(backend, [EOS_ID], regex=r"ab+c")
    before = allowed(backend_, grammar)
    assert not grammar.accept_tokens(encode("x"))
    assert allowed(backend_, grammar) == before
    assert grammar.accept_tokens(encode("abbc") + [EOS_ID])


@pytest.mark.parametrize("backend", BACKENDS)
def test_validate_tokens_gives_the_allowed_prefix_and_changes_nothing(backend):
    backend_, grammar = matcher(backend, [EOS_ID], regex=r"[a-c]+")
    tokens = encode("abc") + [EOS_ID] + encode("a")
    before = allowed(backend_, grammar)
    assert grammar.validate_tokens(tokens) == tokens[:-1]  # nothing after the stop token
    assert grammar.validate_tokens(encode("ab") + encode("x")) == encode("ab")
    assert not grammar.is_terminated() and allowed(backend_, grammar) == before


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_fill_and_accept_equal_one_row_at_a_time(backend):
    """20 rows: guidance fills them in its thread pool (>= 16 rows), xgrammar in its threads."""
    backend_ = make_backend(backend)
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    texts = ['{"n": 1', '{"n": 12}', '{"', '{"n"', "{"] * 4
    grammars, singles = [], []
    for _ in texts:
        for out in (grammars, singles):
            _, grammar = matcher(backend, [EOS_ID], json=schema)
            out.append(grammar)
    counts = backend_.batch_accept_tokens(grammars, [encode(t) + [EOS_ID] for t in texts])
    assert counts == [num_accepted(g, encode(t) + [EOS_ID]) for g, t in zip(singles, texts)]
    assert counts[1] == len(encode('{"n": 12}')) + 1 and grammars[1].is_terminated()
    live = [i for i, g in enumerate(grammars) if not g.is_terminated()]
    words = num_bitmask_words(backend_.vocab_size)
    batched = np.zeros((len(live), words), dtype=np.int32)
    backend_.batch_fill_bitmask([grammars[i] for i in live], batched, list(range(len(live))))
    for row, i in enumerate(live):
        one = np.zeros((1, words), dtype=np.int32)
        backend_.batch_fill_bitmask([singles[i]], one, [0])
        assert np.array_equal(batched[row], one[0]), texts[i]


@pytest.mark.parametrize("backend", BACKENDS)
def test_ebnf_grammar_is_enforced(backend):
    """xgrammar's EBNF, as guidance translates it to Lark."""
    backend_, grammar = matcher(backend, [EOS_ID], grammar='root ::= "(" [1-9] ("+" [1-9])* ")"')
    assert grammar.validate_tokens(encode("(1+2)") + [EOS_ID]) == encode("(1+2)") + [EOS_ID]
    assert grammar.validate_tokens(encode("(0")) == encode("(")
    first = {tokenizer().decode([t]) for t in allowed(backend_, grammar)}
    assert first == {"("}


def test_guidance_enforces_multiple_of():
    backend_, grammar = matcher("guidance", [EOS_ID], json={"type": "integer", "multipleOf": 5})
    assert grammar.validate_tokens(encode("15") + [EOS_ID]) == encode("15") + [EOS_ID]
    assert grammar.validate_tokens(encode("12") + [EOS_ID]) != encode("12") + [EOS_ID]


def test_guidance_json_is_strict_about_unlisted_properties():
    """As xgrammar's strict mode: an object that lists `properties` gets no other ones."""
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    backend_, grammar = matcher("guidance", [EOS_ID], json=schema)
    assert grammar.validate_tokens(encode('{"a": 1}') + [EOS_ID])[-1] == EOS_ID
    assert len(grammar.validate_tokens(encode('{"b": 1}'))) < len(encode('{"b": 1}'))
    lark = {tokenizer().decode([t]) for t in allowed(backend_, grammar)}
    assert not any(re.search(r"[a-zA-Z]", t) for t in lark)  # only "{" and whitespace
