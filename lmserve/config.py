"""Engine configuration: EngineConfig = ModelConfig + CacheConfig + SchedulerConfig +
ParallelConfig + DeviceConfig.

Every sub-config validates itself at construction; a bad value raises `ConfigError` (a
ValueError) naming the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from lmserve.hf_config import PlainHFConfig, text_config_of

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    pass


def _fail(section: str, name: str, value: object, allowed: str) -> None:
    raise ConfigError(f"{section}.{name}={value!r} is invalid: {allowed}")


def _require_int(section: str, name: str, value: object, lo: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        _fail(section, name, value, f"must be an integer >= {lo}")


_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}
LOAD_FORMATS = ("auto", "safetensors", "dummy", "gguf")  # gguf: same as auto, for a .gguf file
HASH_ALGOS = ("sha256", "xxhash")
SCHEDULING_POLICIES = ("fcfs", "priority")
# full: decode-only batches replay one graph of the whole forward; piecewise: mixed batches
# replay the pieces between attention calls (see lmserve/worker/cuda_graphs.py).
CUDA_GRAPH_MODES = ("full_and_piecewise", "full", "piecewise", "none")
# Weights kept packed on the CPU (lmserve/model/quantize.py). auto: "gguf" for a .gguf model on
# the CPU, else "none"; none: float weights in `dtype` (a GGUF dequantized once: the exact-parity
# path); gguf: the file's 4-bit tensors keep their codes, the rest int8 in groups of 32 (exact
# for Q8_0); int8: every linear layer and the vocabulary requantized to int8 (any checkpoint).
QUANTIZATION_METHODS = ("auto", "none", "gguf", "int8")
# Grammar engines for structured outputs (vLLM's names; lmserve/structured_output/): auto is
# xgrammar. The package each needs.
STRUCTURED_OUTPUTS_BACKENDS = {"auto": "xgrammar", "xgrammar": "xgrammar", "guidance": "llguidance"}


@dataclass
class ModelConfig:
    model: str | None = None  # local HF folder, hub id or .gguf file; None = the default model
    tokenizer: str | None = None  # defaults to `model`
    dtype: str | torch.dtype = "auto"  # auto = the checkpoint's dtype (bf16/fp16/fp32)
    max_model_len: int | None = None  # None = the model's max_position_embeddings
    seed: int = 0
    load_format: str = "auto"
    quantization: str = "auto"  # one of QUANTIZATION_METHODS; resolved by EngineConfig
    revision: str | None = None
    skip_tokenizer_init: bool = False
    enforce_eager: bool = False  # True: never capture CUDA graphs (no effect on CPU)
    cuda_graph_mode: str = "full_and_piecewise"  # one of CUDA_GRAPH_MODES
    max_cuda_graph_size: int = 512  # largest decode batch / mixed-batch token count captured
    hf_config: Any = None  # transformers PretrainedConfig; loaded from `model` when None
    # Most items of each modality one prompt may carry (vLLM's name), e.g. {"image": 2};
    # None: 999 per modality. Only for multimodal models.
    limit_mm_per_prompt: dict[str, int] | str | None = None
    # Hosts image URLs may be fetched from (http/https); None or []: never fetch (data: URLs
    # and images passed in still work).
    allowed_media_domains: list[str] | None = None
    # The grammar engine of structured outputs: "auto" (= "xgrammar"), "xgrammar" or
    # "guidance" (llguidance); resolved to the engine's name at construction.
    structured_outputs_backend: str = "auto"
    model_path: str | None = field(default=None, repr=False)  # resolved local folder

    def __post_init__(self) -> None:
        if self.model is None:
            self.model = _default_model()
        if not isinstance(self.model, str) or not self.model:
            _fail("ModelConfig", "model", self.model, "must be a folder, hub id or .gguf file")
        if self.load_format not in LOAD_FORMATS:
            _fail("ModelConfig", "load_format", self.load_format, f"must be one of {LOAD_FORMATS}")
        if self.load_format == "gguf":  # the converted folder then loads like any other
            if not self.model.lower().endswith(".gguf"):
                _fail("ModelConfig", "load_format", "gguf", "needs model to be a .gguf file")
            self.load_format = "auto"
        _require_int("ModelConfig", "seed", self.seed, lo=0)
        if self.quantization not in QUANTIZATION_METHODS:
            _fail(
                "ModelConfig",
                "quantization",
                self.quantization,
                f"must be one of {QUANTIZATION_METHODS}",
            )
        if self.cuda_graph_mode not in CUDA_GRAPH_MODES:
            _fail(
                "ModelConfig", "cuda_graph_mode", self.cuda_graph_mode,
                f"must be one of {CUDA_GRAPH_MODES}",
            )  # fmt: skip
        _require_int("ModelConfig", "max_cuda_graph_size", self.max_cuda_graph_size)
        self.structured_outputs_backend = _resolve_structured_outputs_backend(
            self.structured_outputs_backend
        )
        if self.hf_config is None:
            self.model_path, self.hf_config = _load_hf_config(self.model, self.revision)
        self.tokenizer = self.tokenizer or self.model_path or self.model
        self.dtype = self._resolve_dtype(self.dtype)
        self.max_model_len = self._resolve_max_model_len(self.max_model_len)
        self.limit_mm_per_prompt = self._resolve_mm_limits(self.limit_mm_per_prompt)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled once, to start the EngineCore process: the HF config travels as a plain
        attribute view so that process never imports transformers (~2 s of start-up)."""
        state = dict(self.__dict__)
        if not isinstance(self.hf_config, PlainHFConfig):
            state["hf_config"] = PlainHFConfig(self.hf_config.to_dict())
        return state

    @property
    def text_config(self) -> Any:
        """The language model's config (the config itself for a text-only model)."""
        return text_config_of(self.hf_config)

    @property
    def is_multimodal(self) -> bool:
        """A vision-language model (LLaVA family): prompts may carry images."""
        return getattr(self.hf_config, "vision_config", None) is not None

    @property
    def derived_max_len(self) -> int:
        return int(getattr(self.text_config, "max_position_embeddings", 2048))

    @property
    def vocab_size(self) -> int:
        return int(self.text_config.vocab_size)

    @property
    def max_tokens_per_image(self) -> int:
        """Placeholder tokens (encoder output rows) of one image; 0 for a text-only model."""
        if not self.is_multimodal:
            return 0
        from lmserve.model.models.llava import num_image_tokens

        return num_image_tokens(self.hf_config)

    def _resolve_mm_limits(self, limits: dict[str, int] | str | None) -> dict[str, int]:
        if isinstance(limits, str):
            try:
                limits = json.loads(limits)
            except json.JSONDecodeError as e:
                raise ConfigError(f"ModelConfig.limit_mm_per_prompt is not valid JSON: {e}") from e
        resolved = {"image": 999}
        if limits is None:
            return resolved
        if not isinstance(limits, dict):
            _fail("ModelConfig", "limit_mm_per_prompt", limits, 'must be a dict like {"image": 2}')
        for modality, limit in limits.items():
            if modality != "image":
                _fail("ModelConfig", "limit_mm_per_prompt", limits, "only 'image' is supported")
            _require_int("ModelConfig", "limit_mm_per_prompt", limit, lo=0)
            resolved[modality] = limit
        return resolved

    def _resolve_dtype(self, dtype: str | torch.dtype) -> torch.dtype:
        if isinstance(dtype, torch.dtype):
            if dtype in _DTYPES.values():
                return dtype
        elif dtype == "auto":
            cfg = getattr(self.hf_config, "dtype", None) or getattr(
                self.hf_config, "torch_dtype", None
            )
            cfg = getattr(torch, cfg) if isinstance(cfg, str) else cfg
            return cfg if cfg in _DTYPES.values() else torch.float32
        elif dtype in _DTYPES:
            return _DTYPES[dtype]
        _fail("ModelConfig", "dtype", dtype, f"must be 'auto' or one of {sorted(_DTYPES)}")

    def _resolve_max_model_len(self, max_model_len: int | None) -> int:
        limit = self.derived_max_len
        if max_model_len is None:
            return limit
        _require_int("ModelConfig", "max_model_len", max_model_len)
        if max_model_len > limit:
            _fail(
                "ModelConfig",
                "max_model_len",
                max_model_len,
                f"exceeds the model's limit (max_position_embeddings={limit})",
            )
        return max_model_len


def _resolve_structured_outputs_backend(name: object) -> str:
    """ "auto" becomes "xgrammar"; a backend whose package is not installed fails now."""
    import importlib.util

    if name not in STRUCTURED_OUTPUTS_BACKENDS:
        _fail(
            "ModelConfig", "structured_outputs_backend", name,
            f"must be one of {tuple(STRUCTURED_OUTPUTS_BACKENDS)}",
        )  # fmt: skip
    resolved = "xgrammar" if name == "auto" else name
    package = STRUCTURED_OUTPUTS_BACKENDS[resolved]
    if importlib.util.find_spec(package) is None:
        _fail(
            "ModelConfig", "structured_outputs_backend", name,
            f"needs the {package!r} package, which is not installed (pip install {package})",
        )  # fmt: skip
    return resolved


def _default_model() -> str:
    from lmserve.model.default_model import DEFAULT_MODEL_NAME, default_model_path

    try:
        path = default_model_path()
    except FileNotFoundError as e:
        raise ConfigError(f"ModelConfig.model=None: {e}") from e
    logger.info("no model given: serving the default model %s (%s)", DEFAULT_MODEL_NAME, path)
    return path


def _load_hf_config(model: str, revision: str | None) -> tuple[str, Any]:
    from lmserve import envs
    from lmserve.hf_config import read_plain_config
    from lmserve.model.loader import resolve_model_path

    model_path = resolve_model_path(model, revision)
    reader = envs.LMSERVE_HF_CONFIG_READER
    if reader not in ("auto", "transformers"):
        raise ConfigError(f"LMSERVE_HF_CONFIG_READER={reader!r}: must be 'auto' or 'transformers'")
    if reader == "auto":
        plain = read_plain_config(model_path)
        if plain is not None:
            return model_path, plain
    from transformers import AutoConfig

    try:
        return model_path, AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"ModelConfig.model={model!r}: cannot read its config.json: {e}") from e


@dataclass
class CacheConfig:
    block_size: int = 16  # tokens per KV block
    gpu_memory_utilization: float = 0.92  # share of GPU memory the engine may use (vLLM 0.26: 0.92)
    num_gpu_blocks_override: int | None = None  # fixed pool size (tests, debugging)
    cpu_kvcache_space_gib: float = 4.0  # KV pool size when running on the CPU
    enable_prefix_caching: bool = True
    prefix_caching_hash_algo: str = "sha256"  # or "xxhash" (faster, not cryptographic)
    num_gpu_blocks: int | None = field(default=None, init=False)  # set once the worker sized it

    def __post_init__(self) -> None:
        bs = self.block_size
        if not isinstance(bs, int) or isinstance(bs, bool) or bs < 1 or bs & (bs - 1) or bs > 256:
            _fail("CacheConfig", "block_size", bs, "must be a power of two in [1, 256]")
        if not 0 < self.gpu_memory_utilization <= 1:
            _fail(
                "CacheConfig",
                "gpu_memory_utilization",
                self.gpu_memory_utilization,
                "must be in (0, 1]",
            )
        if self.num_gpu_blocks_override is not None:
            _require_int("CacheConfig", "num_gpu_blocks_override", self.num_gpu_blocks_override)
        if not self.cpu_kvcache_space_gib > 0:
            _fail("CacheConfig", "cpu_kvcache_space_gib", self.cpu_kvcache_space_gib, "must be > 0")
        if self.prefix_caching_hash_algo not in HASH_ALGOS:
            _fail(
                "CacheConfig",
                "prefix_caching_hash_algo",
                self.prefix_caching_hash_algo,
                f"must be one of {HASH_ALGOS}",
            )


@dataclass
class SchedulerConfig:
    # Requests running in one step. None = auto (EngineConfig.resolve_device_defaults, in the
    # EngineCore process): 1024 on a GPU of >= 70 GiB, else 256, as vLLM's server defaults.
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None  # the token budget of one step
    max_model_len: int = 2048  # copied from ModelConfig by EngineConfig
    enable_chunked_prefill: bool = True
    long_prefill_token_threshold: int = 0  # >0: cap one request's prompt tokens per step
    policy: str = "fcfs"  # or "priority"
    # Schedule and prepare step N+1 while the device runs step N (its input tokens come from
    # step N's sampled tokens on the device). None = auto: on for CUDA, without speculative
    # decoding and tensor parallelism (see EngineConfig.__post_init__).
    async_scheduling: bool | None = None
    # Multimodal models: image embedding rows the vision encoder may produce in one step
    # (a step stops before an image that does not fit), and rows the encoder cache holds.
    # None: max_num_batched_tokens, and at least one image's worth (set by EngineConfig).
    max_num_encoder_input_tokens: int | None = None
    encoder_cache_size: int | None = None

    def __post_init__(self) -> None:
        if self.max_num_seqs is not None:
            _require_int("SchedulerConfig", "max_num_seqs", self.max_num_seqs)
        _require_int("SchedulerConfig", "max_model_len", self.max_model_len)
        if self.max_num_batched_tokens is None:
            default = 8192 if self.enable_chunked_prefill else max(8192, self.max_model_len)
            self.max_num_batched_tokens = default
        _require_int("SchedulerConfig", "max_num_batched_tokens", self.max_num_batched_tokens)
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            _fail(
                "SchedulerConfig",
                "max_num_batched_tokens",
                self.max_num_batched_tokens,
                f"must be >= max_model_len={self.max_model_len} when chunked prefill is off",
            )
        _require_int(
            "SchedulerConfig",
            "long_prefill_token_threshold",
            self.long_prefill_token_threshold,
            lo=0,
        )
        if self.long_prefill_token_threshold and not self.enable_chunked_prefill:
            _fail(
                "SchedulerConfig",
                "long_prefill_token_threshold",
                self.long_prefill_token_threshold,
                "needs enable_chunked_prefill=True (a capped prompt must be chunked)",
            )
        if self.policy not in SCHEDULING_POLICIES:
            _fail("SchedulerConfig", "policy", self.policy, f"must be one of {SCHEDULING_POLICIES}")
        for name in ("max_num_encoder_input_tokens", "encoder_cache_size"):
            if getattr(self, name) is not None:
                _require_int("SchedulerConfig", name, getattr(self, name))
        if self.async_scheduling is not None and not isinstance(self.async_scheduling, bool):
            _fail(
                "SchedulerConfig",
                "async_scheduling",
                self.async_scheduling,
                "must be True, False or None (auto)",
            )


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        _require_int("ParallelConfig", "tensor_parallel_size", self.tensor_parallel_size)


@dataclass
class DeviceConfig:
    device: str = "auto"  # "auto" = cuda when available, else cpu

    def __post_init__(self) -> None:
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device not in ("cpu", "cuda"):
            _fail("DeviceConfig", "device", self.device, "must be 'auto', 'cpu' or 'cuda'")
        if self.device == "cuda" and not torch.cuda.is_available():
            _fail("DeviceConfig", "device", self.device, "CUDA is not available on this machine")


SPEC_METHODS = ("ngram", "draft_model")
_NGRAM_DEFAULT_LOOKUP = 5  # vLLM's default n when neither prompt_lookup_min nor _max is given


@dataclass
class SpeculativeConfig:
    """Speculative decoding: `speculative_config={...}` on `LLM`, `--speculative-config '<json>'`
    on the CLI (vLLM's keys).

        {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2,
         "prompt_lookup_max": 5}
        {"method": "draft_model", "model": "path/to/small-model", "num_speculative_tokens": 4}

    ngram: prompt lookup — the longest suffix n-gram of a request's tokens (min <= n <= max)
    found earlier in them proposes the k tokens that followed it. draft_model: a smaller model
    with the target's tokenizer proposes k tokens greedily; it runs in the same runner, with
    its own KV cache on the target's block ids (same dtype, same max_model_len).
    """

    method: str
    num_speculative_tokens: int  # k: draft tokens proposed per request per step
    prompt_lookup_min: int | None = None  # ngram: shortest n-gram; default = max (or 5)
    prompt_lookup_max: int | None = None  # ngram: longest n-gram; default = min (or 5)
    model: str | None = None  # draft_model: folder, hub id or .gguf file
    revision: str | None = None  # draft_model: hub revision
    load_format: str | None = None  # draft_model: default = the target's load_format
    draft_model_config: ModelConfig | None = field(default=None, init=False)  # set by finalize

    def __post_init__(self) -> None:
        section = "speculative_config"
        if self.method not in SPEC_METHODS:
            _fail(section, "method", self.method, f"must be one of {SPEC_METHODS}")
        _require_int(section, "num_speculative_tokens", self.num_speculative_tokens)
        if self.method == "ngram":
            self._check_ngram(section)
        else:
            self._check_draft_model(section)

    def _check_ngram(self, section: str) -> None:
        for name in ("model", "revision", "load_format"):
            if getattr(self, name) is not None:
                _fail(section, name, getattr(self, name), "is only for method 'draft_model'")
        lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
        if lo is None and hi is None:
            lo = hi = _NGRAM_DEFAULT_LOOKUP
        lo, hi = (hi if lo is None else lo), (lo if hi is None else hi)
        _require_int(section, "prompt_lookup_min", lo)
        _require_int(section, "prompt_lookup_max", hi)
        if lo > hi:
            _fail(section, "prompt_lookup_min", lo, f"must be <= prompt_lookup_max={hi}")
        self.prompt_lookup_min, self.prompt_lookup_max = lo, hi

    def _check_draft_model(self, section: str) -> None:
        for name in ("prompt_lookup_min", "prompt_lookup_max"):
            if getattr(self, name) is not None:
                _fail(section, name, getattr(self, name), "is only for method 'ngram'")
        if not isinstance(self.model, str) or not self.model:
            _fail(section, "model", self.model, "method 'draft_model' needs the draft model's path")

    @classmethod
    def from_user(cls, value: Any, target: ModelConfig) -> SpeculativeConfig | None:
        """From a dict (or a JSON object string, or a SpeculativeConfig); None stays None.
        Unknown keys raise ConfigError listing the accepted ones."""
        if value is None or isinstance(value, cls):
            return value.finalize(target) if value is not None else None
        accepted = sorted(f.name for f in dataclasses.fields(cls) if f.init)
        value = _user_dict(
            "speculative_config", value, accepted, ("method", "num_speculative_tokens")
        )
        return cls(**value).finalize(target)

    def finalize(self, target: ModelConfig) -> SpeculativeConfig:
        """Load the draft model's config (draft_model): same dtype and max_model_len as the
        target, and the same vocabulary size."""
        if self.method != "draft_model" or self.draft_model_config is not None:
            return self
        try:
            draft = ModelConfig(
                model=self.model,
                dtype=target.dtype,
                max_model_len=target.max_model_len,
                seed=target.seed,
                load_format=self.load_format or target.load_format,
                revision=self.revision,
                skip_tokenizer_init=True,
                enforce_eager=True,
            )
        except (ConfigError, OSError) as e:
            raise ConfigError(f"speculative_config.model={self.model!r}: {e}") from e
        if draft.vocab_size != target.vocab_size:
            _fail(
                "speculative_config",
                "model",
                self.model,
                f"its vocabulary has {draft.vocab_size} tokens, the target's {target.vocab_size};"
                " a draft model must share the target's tokenizer",
            )
        self.draft_model_config = draft
        return self


KV_CONNECTORS = ("TieredConnector",)
KV_ROLES = ("kv_both", "kv_producer", "kv_consumer")


@dataclass
class TieredConnectorOptions:
    """`kv_connector_extra_config` of the TieredConnector (lmserve/kv_transfer/tiered.py).
    A tier is on when its key is set: the CPU tier by default (cpu_size_gib=0 turns it off),
    the disk tier with `disk_path`, the remote tier with `remote_url`."""

    chunk_size: int = 256  # tokens per stored chunk (LMCache's default); a block_size multiple
    cpu_size_gib: float = 4.0  # host-memory tier, LRU
    disk_path: str | None = None  # one file per chunk, LRU under disk_size_gib
    disk_size_gib: float = 50.0
    remote_url: str | None = None  # redis://host:port/db, shared by every engine
    remote_timeout_s: float = 0.5  # per Redis call; a slow or dead Redis is a miss
    model_id: str | None = None  # overrides the model fingerprint in the keys (same weights
    #                              at different paths hit anyway; set it only to share across
    #                              re-exported copies of one model)

    def __post_init__(self) -> None:
        section = "kv_transfer_config.kv_connector_extra_config"
        _require_int(section, "chunk_size", self.chunk_size)
        for name in ("cpu_size_gib", "disk_size_gib", "remote_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                _fail(section, name, value, "must be a number >= 0")
        if not self.remote_timeout_s > 0:
            _fail(section, "remote_timeout_s", self.remote_timeout_s, "must be > 0")
        for name in ("disk_path", "remote_url", "model_id"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                _fail(section, name, value, "must be a non-empty string")
        if self.remote_url is not None and not self.remote_url.startswith(
            ("redis://", "rediss://", "unix://")
        ):
            _fail(section, "remote_url", self.remote_url, "must be a redis:// URL")
        if self.cpu_size_gib == 0 and self.disk_path is None and self.remote_url is None:
            _fail(section, "cpu_size_gib", 0, "turns off the only tier: set disk_path/remote_url")


@dataclass
class KVTransferConfig:
    """KV storage outside the GPU pool: `kv_transfer_config={...}` on `LLM`,
    `--kv-transfer-config '<json>'` on the CLI (vLLM's keys).

        {"kv_connector": "TieredConnector", "kv_role": "kv_both",
         "kv_connector_extra_config": {"chunk_size": 256, "cpu_size_gib": 4,
             "disk_path": "/var/cache/lmserve-kv", "disk_size_gib": 50,
             "remote_url": "redis://127.0.0.1:6379/0"}}

    kv_role: kv_both loads and saves; kv_producer only saves; kv_consumer only loads.
    """

    kv_connector: str
    kv_role: str = "kv_both"
    kv_connector_extra_config: dict[str, Any] = field(default_factory=dict)
    options: TieredConnectorOptions = field(init=False, repr=False)

    def __post_init__(self) -> None:
        section = "kv_transfer_config"
        if self.kv_connector not in KV_CONNECTORS:
            _fail(section, "kv_connector", self.kv_connector, f"must be one of {KV_CONNECTORS}")
        if self.kv_role not in KV_ROLES:
            _fail(section, "kv_role", self.kv_role, f"must be one of {KV_ROLES}")
        extra = self.kv_connector_extra_config
        if not isinstance(extra, dict):
            _fail(section, "kv_connector_extra_config", extra, "must be a dict")
        accepted = sorted(f.name for f in dataclasses.fields(TieredConnectorOptions))
        unknown = sorted(set(extra) - set(accepted))
        if unknown:
            raise ConfigError(
                f"{section}.kv_connector_extra_config: unknown key(s) {unknown}; "
                f"accepted: {accepted}"
            )
        self.options = TieredConnectorOptions(**extra)

    @property
    def loads(self) -> bool:
        return self.kv_role in ("kv_both", "kv_consumer")

    @property
    def saves(self) -> bool:
        return self.kv_role in ("kv_both", "kv_producer")

    @classmethod
    def from_user(cls, value: Any) -> KVTransferConfig | None:
        """From a dict, a JSON object string or a KVTransferConfig; None stays None."""
        if value is None or isinstance(value, cls):
            return value
        accepted = ["kv_connector", "kv_connector_extra_config", "kv_role"]
        return cls(**_user_dict("kv_transfer_config", value, accepted, ("kv_connector",)))


def _user_dict(
    section: str, value: Any, accepted: list[str], required: tuple[str, ...]
) -> dict[str, Any]:
    """A JSON-object section as the user gave it (a dict, or its JSON text), checked for
    unknown and missing keys; ConfigError names them and the accepted ones."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{section} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise ConfigError(f"{section}={value!r} is invalid: must be a dict")
    unknown = sorted(set(value) - set(accepted))
    if unknown:
        raise ConfigError(f"{section}: unknown key(s) {unknown}; accepted: {accepted}")
    missing = [k for k in required if k not in value]
    if missing:
        raise ConfigError(f"{section}: missing required key(s) {missing}")
    return value


KV_EVENT_PUBLISHERS = ("zmq", "null")
KV_EVENT_FORMATS = ("array", "map")


@dataclass
class KVEventsConfig:
    """KV cache events (lmserve/core/kv_events.py): `kv_events_config={...}` on `LLM`,
    `--kv-events-config '<json>'` on the CLI (vLLM's keys)."""

    enable_kv_cache_events: bool = False
    publisher: str = "zmq"  # "zmq" | "null"
    endpoint: str = "tcp://*:5557"  # the PUB socket
    replay_endpoint: str | None = None  # the ROUTER socket that resends buffered batches
    buffer_steps: int = 10_000  # batches kept for replay
    hwm: int = 100_000  # the PUB socket's send high-water mark
    topic: str = ""
    # lmserve's own key: "array" = events as tagged arrays (["BlockStored", hashes, ...], the
    # positional layout indexers have long read); "map" = vLLM 0.26's maps ({"type":
    # "BlockStored", "block_hashes": ...}), for indexers that read only what vLLM sends today.
    event_format: str = "array"

    def __post_init__(self) -> None:
        section = "kv_events_config"
        if not isinstance(self.enable_kv_cache_events, bool):
            _fail(
                section,
                "enable_kv_cache_events",
                self.enable_kv_cache_events,
                "must be true or false",
            )
        if self.publisher not in KV_EVENT_PUBLISHERS:
            _fail(section, "publisher", self.publisher, f"must be one of {KV_EVENT_PUBLISHERS}")
        for name in ("endpoint", "replay_endpoint"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or "://" not in value):
                _fail(section, name, value, "must be a ZMQ address such as tcp://*:5557")
        _require_int(section, "buffer_steps", self.buffer_steps)
        _require_int(section, "hwm", self.hwm)
        if not isinstance(self.topic, str):
            _fail(section, "topic", self.topic, "must be a string")
        if self.event_format not in KV_EVENT_FORMATS:
            _fail(section, "event_format", self.event_format, f"must be one of {KV_EVENT_FORMATS}")

    @classmethod
    def from_user(cls, value: Any) -> KVEventsConfig | None:
        """From a dict, a JSON object string or a KVEventsConfig; None stays None."""
        if value is None or isinstance(value, cls):
            return value
        accepted = sorted(f.name for f in dataclasses.fields(cls))
        return cls(**_user_dict("kv_events_config", value, accepted, ()))


_LARGE_GPU_BYTES = 70 * 2**30  # H100/H200-class memory: room for many running requests


def default_max_num_seqs(device: str) -> int:
    """1024 on a GPU of >= 70 GiB (H100, H200; not A100, whose throughput drops with a
    larger batch), else 256: vLLM's server defaults, so overload queues no earlier than its."""
    if device != "cuda":
        return 256
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    large = props.total_memory >= _LARGE_GPU_BYTES and "a100" not in props.name.lower()
    return 1024 if large else 256


@dataclass
class EngineConfig:
    model_config: ModelConfig
    cache_config: CacheConfig
    scheduler_config: SchedulerConfig
    parallel_config: ParallelConfig
    device_config: DeviceConfig
    speculative_config: SpeculativeConfig | None = None  # None = no speculative decoding
    kv_transfer_config: KVTransferConfig | None = None  # None = KV only in the GPU pool
    kv_events_config: KVEventsConfig | None = None  # None = no KV cache events

    def __post_init__(self) -> None:
        sched = self.scheduler_config
        self._size_encoder_budget(sched)
        self._resolve_quantization()
        kv = self.kv_transfer_config
        if kv is not None and kv.options.chunk_size % self.cache_config.block_size:
            _fail(
                "kv_transfer_config.kv_connector_extra_config", "chunk_size",
                kv.options.chunk_size, f"must be a multiple of block_size={self.cache_config.block_size}",
            )  # fmt: skip
        if self.device_config.device != "cuda":
            self.resolve_device_defaults()  # no device to ask: resolved now
        blockers = []
        if self.speculative_config is not None:
            blockers.append("speculative decoding")
        if self.parallel_config.tensor_parallel_size > 1:
            blockers.append("tensor_parallel_size > 1")
        if sched.async_scheduling is None:
            sched.async_scheduling = self.device_config.device == "cuda" and not blockers
        elif sched.async_scheduling and blockers:
            _fail(
                "SchedulerConfig",
                "async_scheduling",
                True,
                f"is not supported with {' and '.join(blockers)}",
            )

    def resolve_device_defaults(self) -> None:
        """Defaults that depend on the device's size, resolved where the device is in use (the
        EngineCore process), so a front-end never opens a CUDA context to read them."""
        sched = self.scheduler_config
        if sched.max_num_seqs is None:
            sched.max_num_seqs = default_max_num_seqs(self.device_config.device)

    def _resolve_quantization(self) -> None:
        """ "auto" becomes "gguf" for a .gguf model on the CPU (when torch has the packed
        kernels), else "none"; a method that cannot run here fails now, not at load time."""
        from lmserve.model.layers.quantization import packed_kernels_available

        mc, device = self.model_config, self.device_config.device
        is_gguf = mc.model.lower().endswith(".gguf")
        method = mc.quantization
        if method == "auto":
            packable = is_gguf and device == "cpu" and mc.load_format != "dummy"
            method = "gguf" if packable and packed_kernels_available() else "none"
        elif method != "none" and device != "cpu":
            _fail(
                "ModelConfig",
                "quantization",
                method,
                f"runs on the CPU only (device is {device!r})",
            )
        elif method != "none" and not packed_kernels_available():
            _fail(
                "ModelConfig",
                "quantization",
                method,
                f"needs torch's packed CPU kernels (torch {torch.__version__})",
            )
        elif method == "gguf" and (not is_gguf or mc.load_format == "dummy"):
            _fail("ModelConfig", "quantization", method, "needs a .gguf model with its weights")
        mc.quantization = method

    def _size_encoder_budget(self, sched: SchedulerConfig) -> None:
        """Encoder budget and cache: 0 for a text-only model (no image work anywhere), else
        at least one image (an image is never split between encoder runs)."""
        per_image = self.model_config.max_tokens_per_image
        if not per_image:
            sched.max_num_encoder_input_tokens = sched.encoder_cache_size = 0
            return
        for name in ("max_num_encoder_input_tokens", "encoder_cache_size"):
            value = getattr(sched, name)
            if value is None:
                setattr(sched, name, max(sched.max_num_batched_tokens, per_image))
            elif value < per_image:
                _fail("SchedulerConfig", name, value, f"must be >= {per_image} (one image)")

    @classmethod
    def from_kwargs(cls, model: str, **kwargs: Any) -> EngineConfig:
        """Build from `LLM(...)`-style keyword arguments (vLLM's names). Unknown names raise a
        TypeError listing the accepted ones."""
        sections = {
            ModelConfig: {"model": model},
            CacheConfig: {},
            SchedulerConfig: {},
            ParallelConfig: {},
            DeviceConfig: {},
        }
        aliases = {"scheduling_policy": "policy"}
        speculative = kwargs.pop("speculative_config", None)
        kv_transfer = kwargs.pop("kv_transfer_config", None)
        kv_events = kwargs.pop("kv_events_config", None)
        for key, value in kwargs.items():
            name = aliases.get(key, key)
            target = next((c for c in sections if name in _init_fields(c)), None)
            if target is None:
                allowed = sorted(set().union(*(_init_fields(c) for c in sections)) - {"hf_config"})
                allowed = sorted(
                    [*allowed, "speculative_config", "kv_transfer_config", "kv_events_config"]
                )
                raise TypeError(f"unknown engine argument {key!r}; accepted: {allowed}")
            sections[target][name] = value
        model_config = ModelConfig(**sections[ModelConfig])
        sections[SchedulerConfig]["max_model_len"] = model_config.max_model_len
        return cls(
            model_config=model_config,
            cache_config=CacheConfig(**sections[CacheConfig]),
            scheduler_config=SchedulerConfig(**sections[SchedulerConfig]),
            parallel_config=ParallelConfig(**sections[ParallelConfig]),
            device_config=DeviceConfig(**sections[DeviceConfig]),
            speculative_config=SpeculativeConfig.from_user(speculative, model_config),
            kv_transfer_config=KVTransferConfig.from_user(kv_transfer),
            kv_events_config=KVEventsConfig.from_user(kv_events),
        )


def _init_fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.init and f.name != "model_path"}
