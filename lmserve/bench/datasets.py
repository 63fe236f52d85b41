"""Benchmark datasets. Every length here is a TOKEN count under the benchmark's tokenizer.

    random             each prompt is random tokens: sample ids, decode, re-encode, then trim or
                       pad until the text encodes to exactly the requested length
    sharegpt           a ShareGPT-format JSON file: the first human turn is the prompt, the token
                       count of the first gpt turn after it is the output length
    prefix-repetition  `num_prefixes` random prefixes, each shared by an equal share of the
                       prompts; every prompt is prefix + its own random suffix
    multi-round-qa     `num_users` sessions over one shared system prompt; each user asks
                       `num_rounds` questions in turn and the history (questions and the answers
                       the server actually returned) grows with every round

Token counts exclude the tokenizer's special tokens (a BOS the server may add is not counted),
as in vLLM's datasets. Generation is deterministic for a given seed and tokenizer.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

MAX_FIT_ROUNDS = 16  # re-encode rounds before settling for the closest length found
# ShareGPT filtering (vLLM's): drop too-short pairs and pairs that would not fit a 2k context.
SHAREGPT_MIN_LEN = 4
SHAREGPT_MAX_PROMPT_LEN = 1024
SHAREGPT_MAX_TOTAL_LEN = 2048
_HUMAN_ROLES = ("human", "user")
_GPT_ROLES = ("gpt", "assistant", "chatgpt", "bard", "model")


@dataclass(slots=True)
class SampleRequest:
    """One benchmark request: a prompt and how many tokens to ask for."""

    prompt: str
    prompt_len: int  # tokens of `prompt` (no special tokens)
    expected_output_len: int  # max_tokens sent with the request

    def __post_init__(self) -> None:
        assert self.prompt_len >= 0 and self.expected_output_len >= 1, self


@dataclass(slots=True)
class UserSession:
    """One multi-round-qa user: questions asked one after another over a shared system prompt.

    Round r's request carries the system prompt, questions 0..r and answers 0..r-1 (the texts the
    server returned, passed in by the caller), so the prompt of every round extends the last.
    """

    user_id: int
    system_prompt: str
    questions: list[str]
    answer_len: int  # max_tokens of every round
    question_lens: list[int] = field(default_factory=list)  # tokens of each question
    history: str = ""  # this user's own context (a document), after the shared system prompt

    @property
    def num_rounds(self) -> int:
        return len(self.questions)

    def messages(self, round_index: int, answers: list[str]) -> list[dict[str, str]]:
        """The chat messages of round `round_index` (`answers` holds at least the earlier ones)."""
        assert len(answers) >= round_index, (round_index, len(answers))
        system = f"{self.system_prompt}\n{self.history}" if self.history else self.system_prompt
        messages = [{"role": "system", "content": system}]
        for r in range(round_index):
            messages.append({"role": "user", "content": self.questions[r]})
            messages.append({"role": "assistant", "content": answers[r]})
        messages.append({"role": "user", "content": self.questions[round_index]})
        return messages

    def prompt_text(self, round_index: int, answers: list[str]) -> str:
        """The same history as one text, for /v1/completions: the contents joined by newlines."""
        return "\n".join(m["content"] for m in self.messages(round_index, answers))


# ---- exact-length random text ----------------------------------------------------------------
def encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def decode(tokenizer: Any, token_ids: list[int]) -> str:
    return tokenizer.decode(
        token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False
    )


def candidate_token_ids(tokenizer: Any) -> np.ndarray:
    """Ids random text is drawn from: every non-special token that survives a round trip on its
    own (decode, then encode, gives the id back). This leaves out byte-level BPE's lone
    continuation bytes, which decode to U+FFFD and would re-encode as three other tokens."""
    special = set(tokenizer.all_special_ids or [])
    ids = [i for i in range(len(tokenizer)) if i not in special]
    singles = [[i] for i in ids]
    backend = getattr(tokenizer, "backend_tokenizer", None)  # Rust: ~1 s for a 50k vocabulary
    if backend is not None:
        texts = backend.decode_batch(singles, skip_special_tokens=False)
        encoded = [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    else:
        texts = tokenizer.batch_decode(singles, clean_up_tokenization_spaces=False)
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    kept = [i for i, enc in zip(ids, encoded) if enc == [i]]
    return np.array(kept or ids, dtype=np.int64)


def random_text(
    tokenizer: Any,
    rng: np.random.Generator,
    num_tokens: int,
    prefix_ids: list[int] | None = None,
    pool: np.ndarray | None = None,
) -> tuple[str, list[int]]:
    """(text, its token ids) where the text encodes to exactly `num_tokens` ids, the first of
    which are `prefix_ids` (so texts made with one prefix share those tokens exactly).

    Decoding random ids and re-encoding rarely gives the same ids (neighbours merge, a stray byte
    becomes a replacement character), so this loops: re-encode, trim the excess or pad with fresh
    random ids, until the length is exact. After MAX_FIT_ROUNDS it returns the closest text found;
    for byte-level BPE tokenizers it converges in a few rounds.
    """
    prefix_ids = list(prefix_ids or [])
    p = len(prefix_ids)
    assert num_tokens >= p, (num_tokens, p)
    pool = candidate_token_ids(tokenizer) if pool is None else pool

    def sample(n: int) -> list[int]:
        return rng.choice(pool, size=max(n, 0)).tolist()

    tail = sample(num_tokens - p)
    best: tuple[int, str, list[int]] | None = None
    for round_index in range(MAX_FIT_ROUNDS):
        text = decode(tokenizer, prefix_ids + tail)
        ids = encode(tokenizer, text)
        if ids[:p] != prefix_ids:  # the tail merged into the prefix: draw a new tail
            tail = sample(num_tokens - p)
            continue
        miss = abs(len(ids) - num_tokens)
        if best is None or miss < best[0]:
            best = (miss, text, ids)
        if miss == 0:
            break
        if len(ids) > num_tokens:  # cut deeper each round: a cut inside a character can grow back
            tail = ids[p : max(p, num_tokens - round_index)]
        else:
            tail = ids[p:] + sample(num_tokens - len(ids))
    if best is None:  # every tail merged into the prefix: the prefix alone, then what fits
        text = decode(tokenizer, prefix_ids)
        best = (0, text, encode(tokenizer, text))
    if best[0]:
        logger.warning("random text: wanted %d tokens, got %d", num_tokens, len(best[2]))
    return best[1], best[2]


def _lengths(rng: np.random.Generator, mean: int, range_ratio: float, n: int) -> list[int]:
    """n lengths uniform in [mean * (1 - r), mean * (1 + r)] (at least 1), vLLM's range ratio."""
    if not 0 <= range_ratio < 1:
        raise ValueError(f"range_ratio={range_ratio} must be in [0, 1)")
    low, high = max(1, int(mean * (1 - range_ratio))), max(1, int(mean * (1 + range_ratio)))
    return rng.integers(low, high + 1, size=n).tolist()


# ---- the datasets ----------------------------------------------------------------------------
def random_requests(
    tokenizer: Any,
    num_requests: int,
    input_len: int,
    output_len: int,
    range_ratio: float = 0.0,
    seed: int = 0,
    progress: bool = False,
    output_range_ratio: float | None = None,
) -> list[SampleRequest]:
    """Prompts of random tokens; input and output lengths uniform around the given ones (output
    lengths with `output_range_ratio` when given, else `range_ratio`)."""
    _require_positive(num_requests=num_requests, input_len=input_len, output_len=output_len)
    rng = np.random.default_rng(seed)
    input_lens = _lengths(rng, input_len, range_ratio, num_requests)
    output_ratio = range_ratio if output_range_ratio is None else output_range_ratio
    output_lens = _lengths(rng, output_len, output_ratio, num_requests)
    pool = candidate_token_ids(tokenizer)
    requests = []
    lengths = zip(input_lens, output_lens)
    for n_in, n_out in tqdm(lengths, "Random prompts", num_requests, disable=not progress):
        text, ids = random_text(tokenizer, rng, n_in, pool=pool)
        requests.append(SampleRequest(text, len(ids), n_out))
    return requests


def prefix_repetition_requests(
    tokenizer: Any,
    num_requests: int,
    prefix_len: int,
    suffix_len: int,
    num_prefixes: int,
    output_len: int,
    seed: int = 0,
    progress: bool = False,
) -> list[SampleRequest]:
    """`num_prefixes` random prefixes of `prefix_len` tokens, each the start of an equal share of
    the prompts (the first `num_requests % num_prefixes` prefixes get one more); every prompt
    ends with its own `suffix_len` random tokens. Shuffled, so shared prefixes interleave."""
    _require_positive(num_requests=num_requests, num_prefixes=num_prefixes, output_len=output_len)
    if prefix_len < 0 or suffix_len < 0 or prefix_len + suffix_len < 1:
        raise ValueError(
            f"prefix_len={prefix_len}, suffix_len={suffix_len}: need a non-empty prompt"
        )
    rng = np.random.default_rng(seed)
    pool = candidate_token_ids(tokenizer)
    requests = []
    bar = tqdm(total=num_requests, desc="Prefix-repetition prompts", disable=not progress)
    for k in range(num_prefixes):
        _, prefix_ids = random_text(tokenizer, rng, prefix_len, pool=pool)
        for _ in range(num_requests // num_prefixes + (k < num_requests % num_prefixes)):
            text, ids = random_text(
                tokenizer, rng, len(prefix_ids) + suffix_len, prefix_ids=prefix_ids, pool=pool
            )
            requests.append(SampleRequest(text, len(ids), output_len))
            bar.update(1)
    bar.close()
    order = rng.permutation(len(requests))
    return [requests[i] for i in order]


def sharegpt_requests(
    tokenizer: Any,
    path: str,
    num_requests: int,
    output_len: int | None = None,
    seed: int = 0,
) -> list[SampleRequest]:
    """Prompts from a ShareGPT-format JSON file: a list of {"conversations": [{"from": "human",
    "value": ...}, {"from": "gpt", "value": ...}, ...]}. The first human turn is the prompt and
    the token count of the first gpt turn after it the output length (or `output_len` when
    given). Pairs shorter than 4 tokens, prompts over 1024 tokens and pairs over 2048 tokens are
    skipped (vLLM's filter). Shuffled with `seed`; when the file has fewer usable pairs than
    `num_requests`, pairs are repeated."""
    _require_positive(num_requests=num_requests)
    if not os.path.isfile(path):
        raise ValueError(f"ShareGPT dataset {path!r} is not a file")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read ShareGPT dataset {path!r}: {e}") from e
    if not isinstance(data, list):
        raise ValueError(f"ShareGPT dataset {path!r}: expected a JSON list of conversations")
    rng = np.random.default_rng(seed)
    requests = []
    for i in rng.permutation(len(data)):
        pair = _first_exchange(data[i])
        if pair is None:
            continue
        prompt, completion = pair
        prompt_len = len(encode(tokenizer, prompt))
        n_out = output_len if output_len is not None else len(encode(tokenizer, completion))
        too_short = prompt_len < SHAREGPT_MIN_LEN or (
            output_len is None and n_out < SHAREGPT_MIN_LEN
        )
        too_long = (
            prompt_len > SHAREGPT_MAX_PROMPT_LEN or prompt_len + n_out > SHAREGPT_MAX_TOTAL_LEN
        )
        if too_short or too_long or n_out < 1:
            continue
        requests.append(SampleRequest(prompt, prompt_len, n_out))
        if len(requests) == num_requests:
            break
    if not requests:
        raise ValueError(f"ShareGPT dataset {path!r} has no usable human/gpt pair")
    if len(requests) < num_requests:
        logger.warning("ShareGPT: %d usable pairs, repeating them", len(requests))
        extra = rng.choice(len(requests), size=num_requests - len(requests)).tolist()
        requests += [requests[i] for i in extra]
    return requests


def _first_exchange(entry: Any) -> tuple[str, str] | None:
    """(first human turn, first gpt turn after it) of one ShareGPT entry, or None."""
    if not isinstance(entry, dict):
        return None
    turns = entry.get("conversations", entry.get("conversation"))
    if not isinstance(turns, list):
        return None
    prompt = None
    for turn in turns:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            continue
        role = str(turn.get("from", "")).lower()
        if prompt is None and role in _HUMAN_ROLES:
            prompt = turn["value"]
        elif prompt is not None and role in _GPT_ROLES:
            return prompt, turn["value"]
    return None


def multi_round_qa_sessions(
    tokenizer: Any,
    num_users: int,
    num_rounds: int,
    system_prompt_len: int,
    question_len: int,
    answer_len: int,
    seed: int = 0,
    user_history_len: int = 0,
) -> list[UserSession]:
    """`num_users` sessions of `num_rounds` random questions (`question_len` tokens each) over
    one shared random system prompt (`system_prompt_len` tokens), each user with a context of
    its own (`user_history_len` tokens, LMCache's `--user-history-prompt`) after it."""
    _require_positive(
        num_users=num_users, num_rounds=num_rounds, question_len=question_len, answer_len=answer_len
    )
    for name, value in (("system_prompt_len", system_prompt_len),
                        ("user_history_len", user_history_len)):  # fmt: skip
        if value < 0:
            raise ValueError(f"{name}={value} must be >= 0")
    rng = np.random.default_rng(seed)
    pool = candidate_token_ids(tokenizer)
    system_prompt = random_text(tokenizer, rng, system_prompt_len, pool=pool)[0]
    sessions = []
    for user_id in range(num_users):
        questions = [
            random_text(tokenizer, rng, question_len, pool=pool) for _ in range(num_rounds)
        ]
        history = (
            random_text(tokenizer, rng, user_history_len, pool=pool)[0] if user_history_len else ""
        )
        sessions.append(
            UserSession(
                user_id=user_id,
                system_prompt=system_prompt,
                questions=[text for text, _ in questions],
                answer_len=answer_len,
                question_lens=[len(ids) for _, ids in questions],
                history=history,
            )
        )
    return sessions


def _require_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be an integer >= 1")


# ---- command-line plumbing shared by `bench throughput` and `bench serve` ---------------------
DATASET_NAMES = ("random", "sharegpt", "prefix-repetition")
DEFAULT_OUTPUT_LEN = 128


def add_dataset_args(parser: Any, multi_round: bool = False) -> None:
    """Dataset flags (vLLM's `--random-*` / `--prefix-repetition-*` spellings are aliases)."""
    names = DATASET_NAMES + (("multi-round-qa",) if multi_round else ())
    group = parser.add_argument_group("dataset")
    group.add_argument(
        "--dataset-name",
        choices=names,
        default=None,
        help="default: sharegpt with --dataset-path, else random",
    )
    group.add_argument("--dataset-path", default=None, help="ShareGPT-format JSON file")
    group.add_argument("--num-prompts", type=int, default=1000, help="requests to send")
    group.add_argument(
        "--input-len", "--random-input-len", dest="input_len", type=int, default=1024
    )
    group.add_argument(
        "--output-len",
        "--random-output-len",
        dest="output_len",
        type=int,
        default=None,
        help=f"output tokens per request (default {DEFAULT_OUTPUT_LEN}; sharegpt: the gpt turn's)",
    )
    group.add_argument(
        "--range-ratio",
        "--random-range-ratio",
        dest="range_ratio",
        type=float,
        default=0.0,
        help="random: lengths uniform in [len * (1 - r), len * (1 + r)]",
    )
    group.add_argument(
        "--output-range-ratio",
        dest="output_range_ratio",
        type=float,
        default=None,
        help="random: the output lengths' own range ratio (default: --range-ratio)",
    )
    group.add_argument(
        "--prefix-len", "--prefix-repetition-prefix-len", dest="prefix_len", type=int, default=256
    )
    group.add_argument(
        "--suffix-len", "--prefix-repetition-suffix-len", dest="suffix_len", type=int, default=256
    )
    group.add_argument(
        "--num-prefixes",
        "--prefix-repetition-num-prefixes",
        dest="num_prefixes",
        type=int,
        default=10,
    )
    if multi_round:
        group.add_argument("--num-users", type=int, default=10, help="multi-round-qa: users")
        group.add_argument(
            "--num-rounds", type=int, default=5, help="multi-round-qa: rounds per user"
        )
        group.add_argument(
            "--system-prompt-len",
            type=int,
            default=1000,
            help="multi-round-qa: shared system prompt tokens",
        )
        group.add_argument(
            "--user-history-len",
            type=int,
            default=0,
            help="multi-round-qa: tokens of each user's own context after the system prompt",
        )
        group.add_argument(
            "--question-len", type=int, default=100, help="multi-round-qa: tokens per question"
        )
        group.add_argument(
            "--answer-len", type=int, default=100, help="multi-round-qa: max_tokens per answer"
        )


def dataset_name(args: Any) -> str:
    return args.dataset_name or ("sharegpt" if args.dataset_path else "random")


def build_requests(
    args: Any, tokenizer: Any, seed: int, progress: bool = False
) -> list[SampleRequest]:
    """The requests `args` (from add_dataset_args) describe; multi-round-qa is built separately."""
    name = dataset_name(args)
    output_len = args.output_len if args.output_len is not None else DEFAULT_OUTPUT_LEN
    if name == "random":
        return random_requests(
            tokenizer,
            args.num_prompts,
            args.input_len,
            output_len,
            args.range_ratio,
            seed,
            progress,
            getattr(args, "output_range_ratio", None),
        )
    if name == "prefix-repetition":
        return prefix_repetition_requests(
            tokenizer,
            args.num_prompts,
            args.prefix_len,
            args.suffix_len,
            args.num_prefixes,
            output_len,
            seed,
            progress,
        )
    if name == "sharegpt":
        if not args.dataset_path:
            raise ValueError("--dataset-name sharegpt needs --dataset-path FILE.json")
        return sharegpt_requests(
            tokenizer, args.dataset_path, args.num_prompts, args.output_len, seed
        )
    raise ValueError(f"dataset {name!r} does not give a flat list of requests")
