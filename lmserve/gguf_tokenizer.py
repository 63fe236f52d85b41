"""A GGUF file's tokenizer as a Hugging Face tokenizer folder, from its `tokenizer.ggml.*`
metadata alone (no weights read).

    save_gguf_tokenizer(gguf_path, reader, out_dir)   tokenizer.json, tokenizer_config.json and
                                                      the chat template into out_dir
    gguf_tokenizer_folder(gguf_path)                  the same into a new temporary folder
    gguf_field(reader, key, default)                  one metadata value

Torch-free (gguf, tokenizers, transformers' tokenizer classes), so the router loads the engines'
tokenizer from the .gguf they serve (`lmserve router --tokenizer model.gguf`) without the model
package; the engine's converter (lmserve/model/gguf_loader.py) writes its folder's tokenizer
with the same function.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

logger = logging.getLogger(__name__)

# llama.cpp pre-tokenizers (llama-vocab.cpp) for byte-level BPE vocabularies. These split
# every digit off on its own before GPT-2's regex (transformers' GGUF converter drops that):
_DIGIT_SPLIT_PRETOKENIZERS = frozenset(
    ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b")
)
# ... and these use Llama 3's regex (numbers in groups of up to three digits), look a whole word
# up in the vocabulary before merging, and add bos unless the metadata says otherwise.
_LLAMA3_PRETOKENIZERS = frozenset(
    ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2")
)
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_USER_DEFINED = 1, 3, 4


def gguf_tokenizer_folder(gguf_path: str) -> str:
    """A new temporary folder holding the tokenizer `save_gguf_tokenizer` builds for
    `gguf_path` (the engine's converted folder holds the same files)."""
    from gguf import GGUFReader

    out_dir = tempfile.mkdtemp(prefix="lmserve-gguf-tokenizer-")
    save_gguf_tokenizer(gguf_path, GGUFReader(gguf_path), out_dir)
    return out_dir


def save_gguf_tokenizer(gguf_path: str, reader, out_dir: str) -> None:
    """Build the tokenizer from `tokenizer.ggml.*` and save it (tokenizer.json,
    tokenizer_config.json, the chat template) into `out_dir`.

    Byte-level BPE vocabularies (tokenizer.ggml.model == "gpt2": SmolLM2, Llama 3, ...) are built
    here with `tokenizers`, the way llama.cpp tokenizes them. Others (SentencePiece "llama", ...)
    go through transformers' GGUF converter, with the special tokens then set from the metadata
    (transformers 5.17's converter, for one, names the wrong eos token)."""
    byte_level = gguf_field(reader, "tokenizer.ggml.model") == "gpt2"
    if byte_level:
        tokenizer = _byte_level_bpe_tokenizer(reader)
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(
            os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path)
        )
        for role, token in _special_tokens(reader).items():
            setattr(tokenizer, role, token)
    # llama.cpp's defaults where the metadata is silent: SentencePiece and Llama 3's
    # pre-tokenizers add bos, other byte-level ones do not; none adds eos.
    pre = gguf_field(reader, "tokenizer.ggml.pre")
    add_bos = gguf_field(
        reader, "tokenizer.ggml.add_bos_token", not byte_level or pre in _LLAMA3_PRETOKENIZERS
    )
    add_eos = gguf_field(reader, "tokenizer.ggml.add_eos_token", False)
    _set_bos_eos_template(tokenizer, add_bos, add_eos)
    template = gguf_field(reader, "tokenizer.chat_template")
    if template:
        tokenizer.chat_template = template
    tokenizer.save_pretrained(out_dir)


def _special_tokens(reader) -> dict[str, str]:
    """{"bos_token": "<|im_start|>", ...} for the special-token ids the metadata names."""
    tokens = gguf_field(reader, "tokenizer.ggml.tokens")
    keys = {"bos_token": "bos", "eos_token": "eos", "unk_token": "unknown", "pad_token": "padding"}
    special = {}
    for role, key in keys.items():
        token_id = gguf_field(reader, f"tokenizer.ggml.{key}_token_id")
        if token_id is not None and 0 <= token_id < len(tokens):
            special[role] = tokens[token_id]
    return special


def _byte_level_bpe_tokenizer(reader) -> Any:
    """A transformers fast tokenizer for a GGUF byte-level BPE vocabulary: vocab and merges,
    llama.cpp's pre-tokenizer for `tokenizer.ggml.pre`, control tokens as special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    tokens: list[str] = gguf_field(reader, "tokenizer.ggml.tokens")
    token_types = gguf_field(reader, "tokenizer.ggml.token_type", [_TOKEN_NORMAL] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in gguf_field(reader, "tokenizer.ggml.merges", [])]
    pre = gguf_field(reader, "tokenizer.ggml.pre", "default")
    llama3 = pre in _LLAMA3_PRETOKENIZERS
    vocab = {t: i for i, t in enumerate(tokens)}
    backend = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, ignore_merges=llama3))
    backend.pre_tokenizer = _byte_level_pre_tokenizer(
        pre, bool(gguf_field(reader, "tokenizer.ggml.add_space_prefix", False))
    )
    backend.decoder = decoders.ByteLevel()
    control = [t for t, kind in zip(tokens, token_types) if kind == _TOKEN_CONTROL]
    user_defined = [t for t, kind in zip(tokens, token_types) if kind == _TOKEN_USER_DEFINED]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user_defined])

    return PreTrainedTokenizerFast(
        tokenizer_object=backend, clean_up_tokenization_spaces=False, **_special_tokens(reader)
    )


def _set_bos_eos_template(tokenizer, add_bos: bool, add_eos: bool) -> None:
    """Make encoding add bos / eos exactly as the GGUF says (transformers' converters differ
    between versions here): "<s> $A" for one sequence, "<s> $A <s>:1 $B:1" for a pair."""
    from tokenizers import processors

    bos = tokenizer.bos_token if add_bos else None
    eos = tokenizer.eos_token if add_eos else None
    single = [t for t in (bos, "$A", eos) if t]
    pair = single + [f"{t}:1" for t in (bos, "$B", eos) if t]
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=" ".join(single),
        pair=" ".join(pair),
        special_tokens=[
            (t, tokenizer.convert_tokens_to_ids(t)) for t in dict.fromkeys((bos, eos)) if t
        ],
    )


def _byte_level_pre_tokenizer(pre: str, add_prefix_space: bool) -> Any:
    """llama.cpp's pre-tokenizer `pre` (its regexes in llama-vocab.cpp) as a `tokenizers` one."""
    from tokenizers import Regex, pre_tokenizers

    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=True)
    if pre in _DIGIT_SPLIT_PRETOKENIZERS:  # "2024" -> "2" "0" "2" "4", then GPT-2's regex
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2])
    if pre in _LLAMA3_PRETOKENIZERS:
        split = pre_tokenizers.Split(Regex(_LLAMA3_REGEX), behavior="isolated")
        no_regex = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=False)
        return pre_tokenizers.Sequence([split, no_regex])
    if pre not in ("default", "gpt2"):
        logger.warning("GGUF pre-tokenizer %r is not known here; using GPT-2's regex", pre)
    return gpt2


def gguf_field(reader, key: str, default: Any = None) -> Any:
    """The value of metadata field `key`, or `default` when the file has none."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()
