"""The router's piecewise tokenizer: ids equal to whole-text encoding, history pieces reused,
and the pieces switched off where a tokenizer makes them inexact."""

from __future__ import annotations

import random

from lmserve.router.prompt_tokens import PromptTokenizer, SegmentEncoder


def _conversation(rng: random.Random, rounds: int) -> list[dict[str, str]]:
    words = ["alpha", " beta", "gamma,", " delta.", "\n", "  ", "épsilon", "zeta?", "42", "\t"]
    text = lambda n: "".join(rng.choice(words) for _ in range(n))  # noqa: E731
    messages = [{"role": "system", "content": text(60)}]
    for _ in range(rounds):
        messages += [{"role": "user", "content": text(12)},
                     {"role": "assistant", "content": text(8)}]  # fmt: skip
    return messages + [{"role": "user", "content": text(12)}]


class CountingTokenizer:
    """A tokenizers.Tokenizer that counts the characters it was asked to encode."""

    def __init__(self, inner) -> None:
        self.inner, self.chars = inner, 0

    def encode_batch_fast(self, texts, add_special_tokens):
        self.chars += sum(map(len, texts))
        return self.inner.encode_batch_fast(texts, add_special_tokens=add_special_tokens)

    def get_added_tokens_decoder(self):
        return self.inner.get_added_tokens_decoder()


def test_piecewise_ids_equal_whole_text_and_a_returning_conversation_encodes_only_its_news(
    tiny_model_dir,
):
    tokens = PromptTokenizer.load(tiny_model_dir("llama"))
    assert tokens.segments.enabled
    rng = random.Random(0)
    for rounds in range(6):
        body = {"messages": _conversation(random.Random(rounds), rounds)}
        ids = tokens.for_body(body)
        assert ids == tokens.segments.whole(tokens.render_chat(body)), rounds
    assert tokens.segments.enabled  # every check agreed

    counting = CountingTokenizer(tokens.tokenizer)
    encoder = SegmentEncoder(counting)
    history = _conversation(rng, 4)
    text = tokens.render_chat({"messages": history})
    encoder.encode(text)
    counting.chars = 0
    encoder.calls = 100  # past the checked requests: no whole-text check on this one
    more = history + [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "next"}]
    encoder.encode(tokens.render_chat({"messages": more}))
    assert 0 < counting.chars < 40  # the new messages' pieces, not the history again


def test_default_models_tokenizer_pieces_match_transformers_chat_template(tmp_path, default_model):
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    from lmserve.engine.chat import apply_chat_template, validate_conversation
    from lmserve.gguf_tokenizer import save_gguf_tokenizer

    save_gguf_tokenizer(default_model, GGUFReader(default_model), str(tmp_path))
    tokens = PromptTokenizer.load(str(tmp_path))
    assert tokens.segments.enabled  # SmolLM2: byte-level BPE, plain added tokens
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    for rounds in range(4):
        conversation = _conversation(random.Random(10 + rounds), rounds)
        engine_side = apply_chat_template(hf, validate_conversation(conversation))
        assert tokens.for_body({"messages": conversation}) == engine_side
    assert tokens.segments.enabled


def test_a_gguf_tokenizer_gives_the_ids_the_engine_computes_for_that_gguf(
    tmp_path, monkeypatch, default_model
):
    """`lmserve router --tokenizer model.gguf`: the same ids as the engine serving that file
    (its converted folder), with no weights read on the router's side."""
    import os

    from transformers import AutoTokenizer

    from lmserve.engine.chat import apply_chat_template, validate_conversation
    from lmserve.model.loader import resolve_model_path

    monkeypatch.setenv("LMSERVE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    os.makedirs(tmp_path / "tmp")
    tokens = PromptTokenizer.load(default_model)
    assert os.listdir(tmp_path / "tmp") == []  # its temporary folder is gone
    assert not (tmp_path / "cache").exists()  # nothing converted for the router
    engine = AutoTokenizer.from_pretrained(resolve_model_path(default_model))
    for rounds in (0, 3):
        conversation = _conversation(random.Random(20 + rounds), rounds)
        assert tokens.for_body({"messages": conversation}) == apply_chat_template(
            engine, validate_conversation(conversation)
        )
    assert (
        tokens.for_body({"prompt": "Hello there, 2024!"})
        == engine("Hello there, 2024!")["input_ids"]
    )


def test_a_file_named_gguf_that_is_not_one_is_a_clear_error(tmp_path):
    import pytest

    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="cannot read a tokenizer from this GGUF file"):
        PromptTokenizer.load(str(bad))


def test_added_tokens_that_strip_whitespace_keep_whole_text_encoding():
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens([AddedToken("<sep>", lstrip=True, special=True)])
    assert not SegmentEncoder(tokenizer).enabled
    assert SegmentEncoder(tokenizer).encode("a <sep> b") == tokenizer.encode("a <sep> b").ids


def test_a_position_sensitive_pre_tokenizer_is_caught_by_the_checks():
    """Metaspace with prepend_scheme="first" marks the text's start with a word boundary; a
    piece encoded alone would get one after every added token, which the whole text does not
    have, so the probe (or a request check) turns the pieces off and the ids stay exact."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<|im_start|>"],
                                  show_progress=False)  # fmt: skip
    tokenizer.train_from_iterator(["hello world the end text in between"] * 20, trainer=trainer)
    encoder = SegmentEncoder(tokenizer)
    text = "hello<|im_start|>world the end"
    assert encoder.encode(text) == tokenizer.encode(text, add_special_tokens=False).ids
    assert not encoder.enabled
