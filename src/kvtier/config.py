"""Every setting, one dataclass per part.

Sources, later ones win: defaults < YAML file (``--config`` or ``KVTIER_CONFIG``) < environment
(``KVTIER_<FIELD>``, e.g. ``KVTIER_BLOCK_SIZE=32``) < explicit arguments (flags, ``LLM(...)`` kwargs).
Field names are unique across parts, so a flat ``name=value`` finds its part; YAML may be flat or
nested by part (``pool: {block_size: 32}``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kvtier.cache.codec import COMPRESSIONS, QUANTIZATIONS, CodecConfig
from kvtier.cache.policy import POLICIES
from kvtier.model.attention import ATTENTION_BACKENDS

ENV_PREFIX = "KVTIER_"
DECODE_GEMV_MODES = ("auto", "on", "off")  # kernels/gemv.GEMV_MODES (that module needs triton)
EXPLICIT_EMPTY = ("disk_path",)  # an empty value is refused, not read as "use the default"


class ConfigError(ValueError):
    pass


@dataclass
class ModelSettings:
    model: str = "synthetic:small"  # a local HF checkpoint folder or synthetic:<name>
    dtype: str = "auto"  # auto (bf16 on CUDA, float32 on CPU for synthetic; the checkpoint's own otherwise)
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    seed: int = 0  # synthetic weights
    attention_backend: str = "auto"  # auto (triton on CUDA when installed, else torch), torch, triton
    cuda_graph_max_batch: int = 256  # decode CUDA graphs up to this batch (CUDA + triton); 0: none
    # CUDA graphs of a step that is one short prefill / extend (a follow-up turn on a cached
    # prefix), up to this many new tokens; 0: none
    cuda_graph_extend_tokens: int = 128
    # CUDA graphs of that row with up to this many decodes of other requests in the same step (a
    # follow-up turn while others decode); 0: none
    cuda_graph_mixed_decodes: int = 16
    # fused path's projections with at most decode_gemv_max_m rows: the small-M Triton kernel
    # (kernels/gemv.py) instead of F.linear. auto: on CUDA only; on: wherever triton runs; off: never
    decode_gemv: str = "auto"
    decode_gemv_max_m: int = 8


@dataclass
class PoolSettings:
    block_size: int = 16
    kv_cache_dtype: str = "auto"  # auto (the model's dtype) or fp8 (e4m3, per-layer/head scales)
    kv_cache_memory: int | None = (
        None  # bytes for the device pool; None: see gpu_memory_utilization / cpu default
    )
    gpu_memory_utilization: float = 0.9  # of the memory free after weights, less the largest step (CUDA)
    cpu_kv_cache_fraction: float = 0.25  # fraction of available RAM when kv_cache_memory is None (CPU)
    eviction_policy: str = "lru"
    enable_prefix_caching: bool = True


@dataclass
class SchedulerSettings:
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    enable_chunked_prefill: bool = True
    # schedule and launch step N+1 while the device runs step N (its sampled ids are read a step late)
    overlap_steps: bool = True


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "kvtier")


LOAD_POLICIES = ("cost", "always")
WRITE_POLICIES = ("auto", "write-back", "write-through", "selective")
SHARED_TIERS = ("redis", "memcached")  # tiers on servers other instances share; each has a <name>_url
TIER_NAMES = ("host", "disk", *SHARED_TIERS)
MEMCACHED_MAX_TTL = 30 * 24 * 3600  # memcached reads a larger expiry as an absolute Unix time


@dataclass
class TierSettings:
    """The hierarchy below the device pool. Codecs are ``<quantization>+<compression>`` or "none"."""

    tiers: str = (
        "auto"  # auto (host on CUDA, disk, redis/memcached when a URL is set), none, or "host,disk,redis"
    )
    tier_policy: str = "lru"  # eviction policy of the host and disk tiers
    # auto: write-through to disk, Redis and memcached (readable by others at once, survives a
    # crash), write-back to the host tier; or write-back, write-through, selective for every tier
    write_policy: str = "auto"
    write_queue_bytes: int = 1 << 30  # blocks waiting to be written, at most; full: the oldest dropped
    # the disk's writes encoded and written by processes of their own (cache/file_writer.py), off
    # the engine's interpreter lock. Off by default: on the H200's long chat, three rounds at
    # 051618f, neither wall nor TTFT beat the writer threads by more than the spread between rounds
    # (docs/benchmarks.md, issue 12), and each engine would start two child processes
    disk_write_process: bool = False
    # on CUDA, evicted blocks go into the host tier's page-locked slots by one DMA from the pool,
    # without a staging slot or a writer thread (False: through the write queue, as the others)
    host_write_direct: bool = True
    exit_flush_timeout: float = 5.0  # seconds the exit (atexit, SIGTERM) waits for queued writes
    load_policy: str = "cost"  # cost: load only what beats recomputing (measured); always: load all hits
    selective_hits: int = 2  # selective: device hits before a block is written down
    # a load from the host tier predicted to take at most this long runs in the step that admits
    # its request, on the engine thread, while the device computes the step in flight; longer ones
    # are queued on the device (device_loads) or the I/O threads, which costs the request a step.
    # 30 ms: on the H200's long chat (loads of up to 580 MB) TTFT p50 117 ms against 150 queued on
    # the device and 215 on the threads (2 ms), the same rounds. 0: never at once
    load_at_once_s: float = 0.03
    # on CUDA, a longer load from the page-locked host tier is queued on a device stream by the
    # engine thread and polled at the next step (False: on the I/O threads, as other tiers' are)
    device_loads: bool = True
    # on CUDA, a load from the page-locked host tier is copied layer by layer under the compute of
    # the step that admits its request (the model waits for each layer's copy before that layer),
    # instead of in full before it; the step's tokens are read only after the load's integrity
    # check, and a failed check recomputes the request. Needs a layer's K (or V) piece of a block
    # to be whole 4 KiB rows of the check's sums (8B at 16 tokens: 32 KiB); other layouts and
    # tiers load whole blocks as above
    layered_loads: bool = True
    host_capacity: int = 4 << 30  # raw blocks in pinned memory: no codec (see HostTier)
    disk_path: str | None = None  # None: the user cache folder (~/.cache/kvtier)
    disk_capacity: int = 16 << 30
    disk_codec: str = "none"
    disk_fsync: bool = False
    disk_max_entries: int = 0  # objects the disk index holds (~300 B each); 0: capacity // smallest object
    redis_url: str | None = None  # redis://, rediss:// (TLS), redis+cluster://
    redis_codec: str = "none+lz4"
    redis_ttl: int | None = None  # seconds
    redis_timeout: float = 0.5
    memcached_url: str | None = None  # memcached://host:port[,host:port...] (keys spread by hashing)
    memcached_codec: str = "none+lz4"
    memcached_ttl: int | None = None  # seconds, at most 30 days
    memcached_timeout: float = 0.5

    def enabled(self, cuda: bool) -> list[str]:
        if self.tiers == "none":
            return []
        if self.tiers == "auto":
            names = (["host"] if cuda else []) + ["disk"]
            return names + [n for n in SHARED_TIERS if getattr(self, f"{n}_url")]
        names = [n.strip() for n in self.tiers.split(",") if n.strip()]
        unknown = [n for n in names if n not in TIER_NAMES]
        if unknown:
            raise ConfigError(
                f"unknown tier {unknown[0]!r}; tiers are {', '.join(TIER_NAMES)} (or auto, none)"
            )
        for name in SHARED_TIERS:
            if name in names and not getattr(self, f"{name}_url"):
                raise ConfigError(f"the {name} tier needs {name}_url (KVTIER_{name.upper()}_URL)")
        return names

    def resolved_disk_path(self) -> str:
        return self.disk_path or default_cache_dir()


RESULT_TIERS = ("memory", "disk", "redis", "memcached")


@dataclass
class ResultSettings:
    """The result cache (whole answers of deterministic requests) and the embedding cache.

    Both store small objects through their own tiers (``result_tiers``, fastest first) with their
    own capacity and policy; the disk and Redis tiers reuse ``disk_path``/``redis_url``, under a
    namespace of their own, so they never mix with KV blocks.
    """

    result_cache: bool = True  # per engine; a request opts out with SamplingParams(result_cache=False)
    embedding_cache: bool = True
    result_tiers: str = "memory"  # comma list of memory, disk, redis, memcached
    result_memory_capacity: int = 256 << 20
    result_disk_capacity: int = 1 << 30
    result_policy: str = "lru"
    result_compression: str = "none"  # none, lz4, zstd
    embedding_batch_size: int = 64

    def tier_names(self) -> list[str]:
        names = [n.strip() for n in self.result_tiers.split(",") if n.strip()]
        unknown = [n for n in names if n not in RESULT_TIERS]
        if unknown:
            raise ConfigError(
                f"unknown result tier {unknown[0]!r}; result tiers are {', '.join(RESULT_TIERS)}"
            )
        return names


@dataclass
class EngineConfig:
    model: ModelSettings = field(default_factory=ModelSettings)
    pool: PoolSettings = field(default_factory=PoolSettings)
    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings)
    tiers: TierSettings = field(default_factory=TierSettings)
    results: ResultSettings = field(default_factory=ResultSettings)

    def parts(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def validate(self) -> None:
        """Every limit a setting has, checked before anything is built; ConfigError names it."""
        p, s, t = self.pool, self.scheduler, self.tiers
        _check_types(self)
        if p.block_size < 1 or p.block_size & (p.block_size - 1):
            raise ConfigError(f"block_size must be a power of two >= 1, got {p.block_size}")
        if p.kv_cache_memory is not None and p.kv_cache_memory <= 0:
            raise ConfigError(f"kv_cache_memory must be > 0 bytes, got {p.kv_cache_memory}")
        if not 0.0 < p.gpu_memory_utilization <= 1.0:
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {p.gpu_memory_utilization}")
        if not 0.0 < p.cpu_kv_cache_fraction <= 1.0:
            raise ConfigError(f"cpu_kv_cache_fraction must be in (0, 1], got {p.cpu_kv_cache_fraction}")
        if p.kv_cache_dtype not in ("auto", "fp8"):
            raise ConfigError(f"kv_cache_dtype must be auto or fp8, got {p.kv_cache_dtype!r}")
        for name in ("cuda_graph_max_batch", "cuda_graph_extend_tokens", "cuda_graph_mixed_decodes"):
            if getattr(self.model, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self.model, name)}")
        if self.model.decode_gemv not in DECODE_GEMV_MODES:
            raise ConfigError(
                f"decode_gemv must be one of {', '.join(DECODE_GEMV_MODES)}, got {self.model.decode_gemv!r}"
            )
        if not 0 <= self.model.decode_gemv_max_m <= 64:
            raise ConfigError(f"decode_gemv_max_m must be in [0, 64], got {self.model.decode_gemv_max_m}")
        if s.max_num_batched_tokens < 1 or s.max_num_seqs < 1:
            raise ConfigError("max_num_batched_tokens and max_num_seqs must be >= 1")
        self._validate_results()
        if s.max_model_len is not None and s.max_model_len < 2:
            raise ConfigError(
                f"max_model_len must be >= 2 tokens (a prompt and one to generate), got {s.max_model_len}"
            )
        if t.load_policy not in LOAD_POLICIES:
            raise ConfigError(f"unknown load_policy {t.load_policy!r}; use {' or '.join(LOAD_POLICIES)}")
        if t.write_policy not in WRITE_POLICIES:
            raise ConfigError(f"unknown write_policy {t.write_policy!r}; use {', '.join(WRITE_POLICIES)}")
        if t.write_queue_bytes <= 0 or t.exit_flush_timeout < 0:
            raise ConfigError(
                f"write_queue_bytes must be > 0 (got {t.write_queue_bytes}) and exit_flush_timeout "
                f">= 0 seconds (got {t.exit_flush_timeout})"
            )
        if t.load_at_once_s < 0:
            raise ConfigError(f"load_at_once_s must be >= 0 seconds (0: never), got {t.load_at_once_s}")
        if t.selective_hits < 0:
            raise ConfigError(f"selective_hits must be >= 0, got {t.selective_hits}")
        if t.disk_max_entries < 0:
            raise ConfigError(
                f"disk_max_entries must be >= 0 (0: derived from disk_capacity), got {t.disk_max_entries}"
            )
        for name in ("host_capacity", "disk_capacity"):
            if getattr(t, name) < 0:
                raise ConfigError(f"{name} must be >= 0 bytes, got {getattr(t, name)}")
        if t.redis_ttl is not None and t.redis_ttl < 1:
            raise ConfigError(f"redis_ttl must be >= 1 second or unset, got {t.redis_ttl}")
        if not t.redis_timeout > 0:
            raise ConfigError(f"redis_timeout must be > 0 seconds, got {t.redis_timeout}")
        if t.memcached_ttl is not None and not 1 <= t.memcached_ttl <= MEMCACHED_MAX_TTL:
            raise ConfigError(
                f"memcached_ttl must be 1..{MEMCACHED_MAX_TTL} seconds (30 days) or unset, "
                f"got {t.memcached_ttl}"
            )
        if not t.memcached_timeout > 0:
            raise ConfigError(f"memcached_timeout must be > 0 seconds, got {t.memcached_timeout}")
        _check_names(self)
        if t.disk_path is not None and not t.disk_path.strip():
            raise ConfigError(
                f"disk_path is empty; leave it unset for the default folder ({default_cache_dir()})"
            )

    def _validate_results(self) -> None:
        r = self.results
        r.tier_names()
        if r.embedding_batch_size < 1:
            raise ConfigError(f"embedding_batch_size must be >= 1, got {r.embedding_batch_size}")
        for name in ("result_memory_capacity", "result_disk_capacity"):
            if getattr(r, name) < 0:
                raise ConfigError(f"{name} must be >= 0 bytes, got {getattr(r, name)}")
        if r.result_compression not in ("none", "lz4", "zstd"):
            raise ConfigError(f"unknown result_compression {r.result_compression!r}; use none, lz4 or zstd")

    @classmethod
    def load(
        cls,
        overrides: dict[str, Any] | None = None,
        yaml_path: str | os.PathLike[str] | None = None,
        env: typing.Mapping[str, str] | None = None,
    ) -> EngineConfig:
        cfg = cls()
        env = os.environ if env is None else env
        yaml_path = yaml_path or env.get(ENV_PREFIX + "CONFIG")
        if yaml_path:
            cfg._apply(_read_yaml(Path(yaml_path)), source=str(yaml_path))
        cfg._apply(_from_env(cfg, env), source="environment")
        cfg._apply({k: v for k, v in (overrides or {}).items() if v is not None}, source="arguments")
        cfg.validate()
        return cfg

    def _apply(self, values: dict[str, Any], source: str) -> None:
        index = {f.name: (part, f) for part in self.parts().values() for f in dataclasses.fields(part)}
        for name, value in _flatten(values, self.parts()).items():
            if name not in index:
                raise ConfigError(f"unknown setting {name!r} in {source}; known: {', '.join(sorted(index))}")
            part, f = index[name]
            if name in EXPLICIT_EMPTY and value == "":  # "" is a mistake here, not "unset"
                setattr(part, name, "")
                continue
            setattr(part, name, _coerce(value, f.type, name))


def _flatten(values: dict[str, Any], parts: dict[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in values.items():
        if k in parts and isinstance(v, dict):
            flat.update(v)
        else:
            flat[k] = v
    return flat


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping, got {type(data).__name__}")
    return data


def _from_env(cfg: EngineConfig, env: typing.Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in cfg.parts().values():
        for f in dataclasses.fields(part):
            value = env.get(ENV_PREFIX + f.name.upper())
            if value is not None:
                out[f.name] = value
    return out


def _coerce(value: Any, annotation: Any, name: str) -> Any:
    """Strings from env and flags into the field's type (int, float, bool, str, optional).

    Values that are already typed must have the field's type: ``block_size=1.5`` or ``True`` is an
    error, never 1 (a bool is not a number, and a float with a fraction is not an integer).
    """
    hint = _resolve(annotation)
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if value is None or (optional and isinstance(value, str) and value.lower() in ("", "none", "null")):
        if optional:
            return None
        raise ConfigError(f"setting {name} cannot be empty")
    try:
        if base is bool:
            return _to_bool(value)
        if base is int and isinstance(value, str) and name.endswith(SIZE_SETTING_SUFFIXES):
            return parse_bytes(value)  # sizes take units, like --kv-cache-memory: 16GiB
        if base is int:
            return _to_int(value)
        if base is float:
            return _to_float(value)
        if not isinstance(value, str):
            raise ValueError(value)
        return value
    except (TypeError, ValueError, OverflowError):
        kind = _KINDS.get(base, getattr(base, "__name__", str(base)))
        if base is int and name.endswith(SIZE_SETTING_SUFFIXES):
            kind = "a size in bytes (4294967296, 4GiB, 512MiB, 2GB)"
        raise ConfigError(f"setting {name} must be {kind}, got {value!r} ({type(value).__name__})") from None


_KINDS = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
    raise ValueError(value)


SIZE_UNITS = {
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
}
SIZE_SETTING_SUFFIXES = ("_memory", "_capacity", "_bytes")  # int settings that are sizes in bytes


def parse_bytes(text: str) -> int:
    """``4294967296``, ``4GiB``, ``512MiB``, ``2GB``: bytes."""
    low = text.strip().lower()
    number, mult = low, 1
    for suffix, unit in SIZE_UNITS.items():
        if low.endswith(suffix):
            number, mult = low[: -len(suffix)], unit
            break
    size = float(number) * mult
    if not math.isfinite(size) or size != int(size):  # a fraction of a byte is a mistake
        raise ValueError(f"not a whole number of bytes: {text!r}")
    return int(size)


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int):
        return value
    number = float(value) if isinstance(value, (str, float)) else float("nan")
    if isinstance(value, str) and "e" not in value.lower() and "." not in value:
        return int(value)
    if not math.isfinite(number) or number != int(number):  # 1.5 is not an integer; 1e9 and 2.0 are
        raise ValueError(value)
    return int(number)


def _to_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(value)
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(value)
    return number


def _resolve(annotation: Any) -> Any:
    if isinstance(annotation, str):
        namespace = {"int": int, "float": float, "bool": bool, "str": str, "None": type(None)}
        parts = [p.strip() for p in annotation.split("|")]
        types_ = [namespace[p] for p in parts]
        if len(types_) == 1:
            return types_[0]
        return typing.Union[tuple(types_)]  # noqa: UP007 - built at run time
    if isinstance(annotation, types.UnionType):
        return typing.Union[annotation.__args__]  # noqa: UP007
    return annotation


def _check_types(cfg: EngineConfig) -> None:
    """Settings assigned by hand (``EngineConfig().pool.block_size = True``) skip ``_coerce``: the
    same strict reading, applied to every field's current value."""
    for part in cfg.parts().values():
        for f in dataclasses.fields(part):
            value = getattr(part, f.name)
            if value is None or (f.name in EXPLICIT_EMPTY and value == ""):
                continue
            setattr(part, f.name, _coerce(value, f.type, f.name))


def parse_codec(text: str) -> CodecConfig:
    """``none``, ``zstd``, ``int8``, ``fp8+lz4``...: quantization and compression in any order."""
    quantization, compression = "none", "none"
    for part in (p.strip() for p in text.split("+") if p.strip()):
        if part in QUANTIZATIONS[1:]:
            quantization = part
        elif part in COMPRESSIONS[1:]:
            compression = part
        elif part != "none":
            names = ", ".join(dict.fromkeys(QUANTIZATIONS + COMPRESSIONS))
            raise ConfigError(f"unknown codec part {part!r} in {text!r}; use {names}")
    return CodecConfig(quantization=quantization, compression=compression)


def _check_names(cfg: EngineConfig) -> None:
    """Settings that name an implementation (a policy, a codec, a tier, a kernel) are checked here,
    before any weights load, with the supported names in the message."""
    for name, value in (
        ("eviction_policy", cfg.pool.eviction_policy),
        ("tier_policy", cfg.tiers.tier_policy),
    ):
        if value not in POLICIES:
            raise ConfigError(f"unknown {name} {value!r}; supported: {', '.join(POLICIES)}")
    if cfg.model.attention_backend not in ATTENTION_BACKENDS:
        raise ConfigError(
            f"unknown attention_backend {cfg.model.attention_backend!r}; "
            f"supported: {', '.join(ATTENTION_BACKENDS)}"
        )
    for name in ("disk_codec", "redis_codec", "memcached_codec"):
        parse_codec(getattr(cfg.tiers, name))
    cfg.tiers.enabled(cuda=False)  # unknown tier names, shared tiers without a URL
