"""Tiny random HF checkpoints (config + safetensors + tokenizer) for tests.

    path = make_tiny_model(tmp_path / "llama", arch="llama")
    AutoModelForCausalLM.from_pretrained(path); AutoTokenizer.from_pretrained(path)

Every parameter is drawn from a seeded generator, with a spread wide enough that the top-1 logit
stands clear of the top-2 (typically by > 0.1, far above float32 noise), so token-exact greedy
parity tests do not flake. Norm weights and biases are random too, so a weight loaded into the
wrong place changes the output. The tokenizer is a byte-level BPE trained on a built-in English
text: any string encodes, ids stay below the model's vocab size, `<s>` (bos) is prepended.
"""

from __future__ import annotations

import os
from typing import Any

import torch

ARCHS = ("llama", "mistral", "qwen2", "qwen3")
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3, in this order

TINY_CONFIG: dict[str, Any] = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    hidden_act="silu",
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    tie_word_embeddings=False,
)
# Per architecture; Qwen3 gets an explicit head_dim unlike hidden_size / num_heads (= 16).
ARCH_CONFIG: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": dict(sliding_window=None),  # served by lmserve's Llama implementation
    "qwen2": {},
    "qwen3": dict(head_dim=32),
}

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}</s>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

TRAINING_TEXT = """\
The small engine hums along the valley road while the morning fog lifts from the river.
A farmer walks to the market with a basket of apples, pears and bright green beans.
Children count the boats on the water: one, two, three, four, five, six, seven, eight.
When the bell rings at noon, the bakers open their doors and the smell of bread fills the air.
Every evening the old teacher writes a short story about the stars, the moon and the sea.
She says that a good question is worth more than a quick answer, and the students agree.
The library keeps maps of distant mountains, lists of birds, and letters from travellers.
Rain falls softly on the roof; the cat sleeps by the window and dreams of quiet gardens.
Numbers like 12, 256 and 1024 appear in the notebook next to drawings of bridges and towers.
How far is the city? Nobody knows exactly, but the road is long and the night is cold.
"""


def make_tiny_model(
    path: str | os.PathLike,
    arch: str = "llama",
    *,
    shard: bool = False,
    max_shard_size: str | int = "100KB",
    seed: int = 0,
    **config_overrides: Any,
) -> str:
    """Write a tiny random `arch` model (float32 safetensors) and its tokenizer into `path`.

    config_overrides go to the HF config class, e.g. tie_word_embeddings=True, head_dim=32,
    rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}.
    shard=True writes several files plus model.safetensors.index.json.
    Returns `path` as a str.
    """
    path = os.fspath(path)
    model = build_tiny_hf_model(arch, seed=seed, **config_overrides)
    model.save_pretrained(path, max_shard_size=max_shard_size if shard else "1GB")
    make_tiny_tokenizer(model.config.vocab_size).save_pretrained(path)
    return path


def tiny_hf_config(arch: str = "llama", **config_overrides: Any):
    """The HF config object `make_tiny_model` would use."""
    import transformers

    if arch not in ARCHS:
        raise ValueError(f"unknown tiny arch {arch!r}; choose from {ARCHS}")
    config_cls = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
    }[arch]
    kwargs = {**TINY_CONFIG, **ARCH_CONFIG[arch], **config_overrides}
    config = config_cls(**kwargs)
    config.architectures = [config_cls.__name__.replace("Config", "ForCausalLM")]
    return config


def build_tiny_hf_model(arch: str = "llama", *, seed: int = 0, **config_overrides: Any):
    """The HF model itself (float32, eval mode, random weights from `seed`), not saved."""
    import transformers

    config = tiny_hf_config(arch, **config_overrides)
    model_cls = getattr(transformers, config.architectures[0])
    with torch.random.fork_rng(devices=[]):  # HF's own init must not move the caller's RNG
        model = model_cls(config).to(torch.float32).eval()
    randomize_weights(model, seed)
    return model


@torch.no_grad()
def randomize_weights(model: torch.nn.Module, seed: int) -> None:
    """Draw every parameter from a seeded generator: embeddings ~ N(0, 1), matrices
    ~ N(0, 1.5 / sqrt(fan_in)), biases ~ N(0, 0.1), norm weights ~ 1 + N(0, 0.2)."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():  # a tied lm_head is visited once
        noise = torch.randn(param.shape, generator=generator)
        if "norm" in name:
            param.copy_(1.0 + 0.2 * noise)
        elif name.endswith("bias"):
            param.copy_(0.1 * noise)
        elif "embed_tokens" in name:
            param.copy_(noise)
        else:  # [out, in]
            param.copy_(noise * 1.5 / param.shape[1] ** 0.5)


def make_tiny_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer (ids < vocab_size) as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_TEXT.splitlines(), trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    assert tokenizer.get_vocab_size() <= vocab_size
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == [UNK_ID, BOS_ID, EOS_ID, PAD_ID]
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        chat_template=CHAT_TEMPLATE,
    )


class PagedKVHarness:
    """Drives a lmserve model by hand, the way the model runner will: per-layer paged KV caches,
    blocks handed out per request (in a scrambled order, so block tables are not contiguous),
    and a flat batch per step.

        harness = PagedKVHarness(hf_config, block_size=4)
        logits = harness.step(model, {"a": [1, 5, 9], "b": [1, 7]})  # {"a": [3, vocab], ...}
        logits = harness.step(model, {"a": [12]})                      # continues request "a"
    """

    def __init__(
        self,
        hf_config,
        num_blocks: int = 128,
        block_size: int = 4,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        from lmserve.attention.torch_backend import TorchAttentionBackend
        from lmserve.model.loader import get_kv_cache_spec

        num_layers, num_kv_heads, head_dim = get_kv_cache_spec(hf_config)
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.kv_caches = [
            (
                torch.zeros(shape, dtype=dtype, device=device),
                torch.zeros(shape, dtype=dtype, device=device),
            )
            for _ in range(num_layers)
        ]  # per layer: 2 x [num_blocks, block_size, num_kv_heads, head_dim]
        self.block_size = block_size
        self.device = torch.device(device)
        self.backend = TorchAttentionBackend()
        self.free_block_ids = torch.randperm(
            num_blocks, generator=torch.Generator().manual_seed(0)
        ).tolist()
        self.block_ids: dict[str, list[int]] = {}
        self.num_computed_tokens: dict[str, int] = {}

    def build_step(self, scheduled: dict[str, list[int]]):
        """(input_ids [num_tokens], positions [num_tokens], ForwardContext) for one step that feeds
        each request its next tokens `scheduled[req_id]`; advances num_computed_tokens."""
        from lmserve.attention.backend import AttentionMetadata, ForwardContext

        input_ids, positions, slot_mapping, query_start_loc, seq_lens = [], [], [], [0], []
        for req_id, token_ids in scheduled.items():
            start = self.num_computed_tokens.get(req_id, 0)
            seq_len = start + len(token_ids)
            blocks = self.block_ids.setdefault(req_id, [])
            while len(blocks) * self.block_size < seq_len:
                blocks.append(self.free_block_ids.pop())
            for pos in range(start, seq_len):
                slot_mapping.append(
                    blocks[pos // self.block_size] * self.block_size + pos % self.block_size
                )
            input_ids += token_ids
            positions += range(start, seq_len)
            query_start_loc.append(query_start_loc[-1] + len(token_ids))
            seq_lens.append(seq_len)
            self.num_computed_tokens[req_id] = seq_len
        max_blocks = max(len(self.block_ids[r]) for r in scheduled)
        block_tables = [
            self.block_ids[r] + [0] * (max_blocks - len(self.block_ids[r])) for r in scheduled
        ]

        def on_device(values, dtype):
            return torch.tensor(values, dtype=dtype, device=self.device)

        metadata = AttentionMetadata(
            num_reqs=len(scheduled),
            num_tokens=len(input_ids),
            max_query_len=max(len(t) for t in scheduled.values()),
            max_seq_len=max(seq_lens),
            slot_mapping=on_device(slot_mapping, torch.int64),
            query_start_loc=on_device(query_start_loc, torch.int32),
            seq_lens=on_device(seq_lens, torch.int32),
            block_tables=on_device(block_tables, torch.int32),
            query_start_loc_cpu=query_start_loc,
            seq_lens_cpu=seq_lens,
        )
        ctx = ForwardContext(
            attn_metadata=metadata, kv_caches=self.kv_caches, attn_backend=self.backend
        )
        return on_device(input_ids, torch.int64), on_device(positions, torch.int64), ctx

    @torch.inference_mode()
    def step(self, model, scheduled: dict[str, list[int]]) -> dict[str, torch.Tensor]:
        """Run one forward; returns each request's logits for its scheduled tokens [q_i, vocab]."""
        input_ids, positions, ctx = self.build_step(scheduled)
        logits = model.compute_logits(model(input_ids, positions, ctx))  # [num_tokens, vocab]
        starts = ctx.attn_metadata.query_start_loc_cpu
        return {req_id: logits[starts[i] : starts[i + 1]] for i, req_id in enumerate(scheduled)}
