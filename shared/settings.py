"""All configuration, read once from ``STREAMQ_*`` environment variables and passed down."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, get_args
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic.functional_validators import BeforeValidator
from pydantic_settings import BaseSettings, SettingsConfigDict
from redis.connection import parse_url

from shared.digits import ascii_digits

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def parse_sentinels(value: str) -> list[tuple[str, int]]:
    """``host:port,host:port`` as (host, port) pairs; a port left out is Sentinel's 26379."""
    addresses = []
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep:
            host, port = item, "26379"
        bracketed = host.startswith("[") and host.endswith("]")  # an IPv6 address, [::1]:26379
        bare = host.strip("[]") if bracketed else host
        # A URL (redis://…), another separator (a;b) or an unbracketed IPv6 address is no host.
        odd = any(c in bare for c in "/;@ \t") or (":" in bare and not bracketed)
        if not bare or odd or not ascii_digits(port) or not 0 < int(port) < 65536:
            raise ValueError(f"a sentinel address is host:port, not {item!r}")
        addresses.append((bare, int(port)))
    return addresses


def _a_number(annotation: Any) -> bool:
    """Whether a setting's type is a number, or a number or None."""
    kinds = [kind for kind in get_args(annotation) or (annotation,) if kind is not type(None)]
    return bool(kinds) and all(kind in (int, float) for kind in kinds)


# The worker's choices, one list each (the command line's options offer the same).
Device = Literal["auto", "cpu", "cuda", "mps"]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Engine = Literal["auto", "transformers", "vllm"]
Backend = Literal["model", "synthetic"]
LogLevel = Annotated[Literal["critical", "error", "warning", "info", "debug"], BeforeValidator(str.lower)]


class Settings(BaseSettings):
    """streamq's settings. Every field can be set as ``STREAMQ_<FIELD>`` (upper case)."""

    model_config = SettingsConfigDict(env_prefix="STREAMQ_", extra="ignore")

    # Redis. None means "not configured": `streamq up` then starts a private redis-server.
    redis_url: str | None = None
    # Redis Sentinel: with sentinels set, every process finds the primary through them and follows
    # a failover by itself; the URL then gives only the database, user and password.
    redis_sentinels: str = Field("", description="sentinels as host:port,host:port,... (empty: no Sentinel)")
    redis_sentinel_master: str = Field("streamq", min_length=1, description="the master's name in Sentinel")
    redis_sentinel_password: SecretStr = Field(SecretStr(""), description="the sentinels' own password")
    redis_wait_replicas: int | None = Field(
        None,
        ge=0,
        description="front: replicas that must hold a new job before its 202 (default: 1 with "
        "sentinels, else 0)",
    )
    redis_wait_ms: int = Field(500, ge=1, description="front: how long a submit waits for those replicas")
    redis_epoch_interval: float = Field(
        2.0, gt=0, description="how often a process checks that Redis still holds its data"
    )
    redis_socket_timeout: float = Field(5.0, gt=0, description="seconds before a Redis command gives up")
    redis_max_connections: int = Field(
        128,
        ge=2,
        description="front: its shared pool, opened as needed (plus 1 stream reader, 2 for RQ, 2 for "
        "prompt counts, 2 for the janitor and epoch check): about the requests in flight per process",
    )
    redis_connect_timeout: float = Field(0.5, gt=0, description="front: seconds to open a Redis connection")
    redis_pool_timeout: float = Field(
        5.0, gt=0, description="front: seconds a request waits for a free pooled connection (under load)"
    )
    redis_command_timeout: float = Field(
        1.0, gt=0, description="front: seconds before a (non-blocking) Redis command gives up"
    )

    # Admission: a model's queue holds at most this many jobs (0: unbounded); a submit beyond
    # it is answered 429 with a Retry-After read off the model's drain rate.
    max_queued: int = Field(1000, ge=0, description="front: most jobs waiting in one model's queue")
    drain_window: float = Field(
        60.0, gt=0, le=120, description="front: seconds of ended jobs the drain rate is measured over"
    )

    # Models this deployment must serve (comma-separated served names): /readyz is false while
    # one of them has no live worker. Empty: ready as soon as any worker is live.
    models: str = ""
    # Autoscaled workers that may all be gone (KEDA minReplicaCount 0): jobs for the models in
    # `models` are queued even with no live worker (one starts because they wait), and /readyz
    # asks only for Redis, so fronts stay in service while workers come and go.
    scale_to_zero: bool = Field(False, description="front: queue jobs for STREAMQ_MODELS with no live worker")

    # The worker serves `model` (a hub name or a local folder) under `served_name`.
    model: str | None = None
    served_name: str | None = None
    device: Device = Field("auto", description="auto: cuda > mps > cpu")
    dtype: Dtype = Field(
        "auto", description="worker: auto is bf16 on CUDA where supported, fp16 on MPS, fp32 on CPU"
    )
    cache_dir: str | None = Field(None, description="where `streamq up` keeps the tiny demo model")
    trust_remote_code: bool = Field(False, description="allow a model's own code (ChatGLM needs it)")
    torch_threads: int | None = Field(None, ge=1, description="CPU threads per worker (default: all cores)")

    # The worker's engine.
    engine: Engine = Field(
        "auto",
        description="worker: 'vllm', 'transformers', or 'auto' (vLLM on a GPU when installed and it "
        "serves the model; else transformers)",
    )
    kv_cache_gib: float | None = Field(
        None,
        gt=0,
        description="worker (vLLM): GiB for the KV cache, per GPU (default: what vLLM leaves of "
        "STREAMQ_GPU_MEMORY_UTILIZATION; on a CPU 4 GiB, or half the memory free at start if less)",
    )
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="worker (vLLM): share of each GPU vLLM takes (default: vLLM's, 0.92)"
    )
    tensor_parallel_size: int = Field(1, ge=1, description="worker (vLLM): GPUs one model is split over")
    pipeline_parallel_size: int = Field(1, ge=1, description="worker (vLLM): pipeline stages over GPUs")
    vllm_eager: bool = Field(
        False, description="worker (vLLM): no compilation or CUDA graphs (starts faster, runs slower)"
    )
    backend: Backend = Field(
        "model", description="'model' (load `model`) or 'synthetic' (a load-test stand-in)"
    )
    slots: int | None = Field(
        None, ge=1, description="jobs one worker runs at once (default: 8 on CPU; on a GPU, what fits)"
    )
    max_seq_len: int | None = Field(
        None, ge=16, description="prompt + answer tokens per job; the KV cache holds slots × this at most"
    )
    prefill_chunk: int = Field(512, ge=16, description="prompt tokens computed per engine step")
    synthetic_tokens_per_second: float = Field(
        20.0, gt=0, allow_inf_nan=False, description="pace of the synthetic backend"
    )
    synthetic_text: str | None = Field(
        None,
        min_length=1,
        description="what the synthetic backend writes, 4 characters a token, repeated (else lorem ipsum)",
    )
    drain_seconds: float = Field(
        30.0, ge=0, description="a stopping worker lets running jobs finish for this long"
    )

    # Crash recovery: a running job's lease, renewed by its worker; the janitor requeues a job
    # whose lease lapsed (its worker died), for another worker to continue it.
    lease_seconds: float = Field(5.0, gt=0, description="a running job's lease lapses after this long")
    lease_renew_seconds: float = Field(1.0, gt=0, description="how often a worker renews its leases")
    janitor_interval: float = Field(1.0, gt=0, description="how often the janitor looks for lapsed leases")
    max_attempts: int = Field(3, ge=1, description="runs a job may start before a lost worker fails it")
    maintenance_interval: int = Field(
        600, ge=1, description="how often a worker prunes RQ's registries of expired jobs (seconds)"
    )

    # Generation limits and defaults.
    default_max_tokens: int = Field(512, ge=1)
    max_tokens_limit: int = Field(4096, ge=1)

    # Job lifetimes (seconds).
    queue_ttl: int = Field(3600, ge=1, description="a queued job not started by then expires")
    job_timeout: int = Field(1800, ge=1, description="longest run of one job on a worker")
    result_ttl: int = Field(3600, ge=1, description="how long a finished job's state and stream are kept")
    stream_maxlen: int = Field(20000, ge=100, description="approximate cap on events per job stream")

    # Streaming.
    publish_interval_ms: int = Field(
        40, ge=0, description="a worker coalesces tokens and writes a job's stream at most this often"
    )
    ping_interval: float = Field(
        15.0, gt=0, description="every stream's keep-alive: sent after this many seconds without output"
    )
    position_poll_interval: float = Field(
        1.0, gt=0, description="how often a waiting stream re-checks its queue position"
    )
    cancel_wait: float = Field(5.0, ge=0, description="cancel waits this long for a running job to stop")
    keep_alive: int = Field(
        75,
        ge=1,
        description="front: seconds an idle HTTP connection is kept open (longer than clients' and load "
        "balancers' own, or a request they send as it closes fails)",
    )
    shutdown_grace: int = Field(5, ge=0, description="a stopping front's wait for its streams, then cut")
    count_timeout: float = Field(2.0, gt=0, description="the front's wait for a worker to count a prompt")

    # Security (see README "Security"). Keys: comma-separated, each `KEY` or `name:KEY`; the file
    # holds one per line. With no keys the front runs open, and only on a loopback address.
    api_keys: SecretStr = Field(SecretStr(""), description="front: API keys, comma-separated")
    api_keys_file: Path | None = Field(None, description="front: a file of API keys, one per line")
    api_workers: int = Field(1, ge=1, le=64, description="front: processes sharing the port (api --workers)")
    insecure: bool = Field(False, description="front: allow running without keys on a non-loopback address")
    key_max_concurrent: int = Field(
        16, ge=0, description="front: jobs one key may have queued or running at once (0: no limit)"
    )
    key_rate_limit: str = Field(
        "120/minute", description="front: job requests per key, as `N/second|minute|hour` ('' or 0: no limit)"
    )
    max_body_bytes: int = Field(1_048_576, ge=1024, description="front: largest request body (413 beyond)")
    max_messages: int = Field(
        256, ge=1, description="front: most messages a request brings (or history turns × 2 + 1)"
    )
    max_prompt_chars: int = Field(200_000, ge=1, description="front: most characters in all messages")
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="most prompt tokens, by the model's tokenizer (default: its context)"
    )
    max_stop_sequences: int = Field(8, ge=0, description="front: most stop sequences per request")
    max_stop_chars: int = Field(200, ge=1, description="front: longest stop sequence, in characters")
    cors_origins: str = Field("", description="front: origins allowed by CORS, comma-separated ('*': any)")
    log_prompts: bool = Field(False, description="log prompt text (off: logs hold no prompt and no key)")

    # Workers' liveness.
    heartbeat_interval: float = Field(2.0, gt=0)
    worker_ttl: float = Field(10.0, gt=0, description="a worker silent this long is no longer live")

    # Operations (deploy): log format, and each worker's Prometheus endpoint.
    gc_freeze: bool = Field(
        True, description="front and worker: freeze the heap alive once started out of garbage collections"
    )
    gc_young_threshold: int = Field(
        10_000,
        ge=0,
        description="front and worker: allocations between two young-generation garbage collections "
        "(0: Python's default)",
    )
    log_format: str = Field("text", pattern="^(text|json)$", description="'json': one JSON object per line")
    log_level: LogLevel = Field("info", description="front and worker (the front's --log-level wins)")
    metrics_port: int = Field(
        9310, ge=0, le=65535, description="worker: first port tried for /metrics (0: none; busy: the next)"
    )
    metrics_host: str = Field(
        "127.0.0.1", description="worker: address its /metrics port listens on (images: 0.0.0.0)"
    )

    def redis_url_or_default(self) -> str:
        return self.redis_url or DEFAULT_REDIS_URL

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.replicas_to_wait_for() and self.redis_wait_ms >= self.redis_command_timeout * 1000:
            raise ValueError(
                "STREAMQ_REDIS_WAIT_MS must be shorter than STREAMQ_REDIS_COMMAND_TIMEOUT (in ms): a "
                "submit's WAIT runs within one command's time"
            )
        if self.stream_maxlen < self.max_tokens_limit + 64:  # an event a token at most, and a few more
            raise ValueError(
                f"STREAMQ_STREAM_MAXLEN ({self.stream_maxlen}) must be at least STREAMQ_MAX_TOKENS_LIMIT "
                f"+ 64 ({self.max_tokens_limit + 64}): Redis would trim the first events of a long answer, "
                "and a reader who came late would get its tail as if it were whole"
            )
        return self

    @field_validator("*", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any, info: ValidationInfo) -> Any:
        """An empty value of a number that is unset by default is unset (compose passes `${X:-}`
        on as an empty string): `STREAMQ_KV_CACHE_GIB=` is vLLM's default, not a refusal. (Not
        for text or paths: an empty key file or Redis URL stays an error, not a quiet default.)"""
        field = cls.model_fields[info.field_name] if info.field_name else None
        if value == "" and field is not None and field.default is None and _a_number(field.annotation):
            return None
        return value

    @field_validator("device", mode="before")
    @classmethod
    def _one_gpu_by_visibility(cls, value: Any) -> Any:
        """``cuda:1`` is a common way to name a GPU: say how a worker is given one."""
        if isinstance(value, str) and value.startswith("cuda:"):
            index = value.removeprefix("cuda:")
            raise ValueError(f"pick the GPU with CUDA_VISIBLE_DEVICES={index} and STREAMQ_DEVICE=cuda")
        return value

    @field_validator("redis_url")
    @classmethod
    def _a_redis_url(cls, value: str | None) -> str | None:
        """A URL redis-py reads as it was meant (its message never repeats the URL: a password)."""
        if value is None:
            return value
        try:
            options = parse_url(value)
        except ValueError as exc:
            raise ValueError(f"not a Redis URL: {exc}") from None
        # redis-py lets the URL's options win over what each pool asks for.
        if "socket_timeout" in options:
            raise ValueError(
                "socket_timeout in the URL would cut streamq's blocking reads (a stream's wait, a "
                "worker's dequeue, a prompt count) short: set STREAMQ_REDIS_SOCKET_TIMEOUT (workers) "
                "and STREAMQ_REDIS_COMMAND_TIMEOUT (the front) instead; blocking reads add their wait"
            )
        if "max_connections" in options or "timeout" in options:
            raise ValueError(
                "max_connections and timeout in the URL would size every pool alike (the front's "
                "shared pool, its stream reader, a worker's): a front's are STREAMQ_REDIS_MAX_CONNECTIONS "
                "and STREAMQ_REDIS_POOL_TIMEOUT; a worker sizes its pool from its slots"
            )
        parts = urlsplit(value)
        database = parts.path.strip("/")
        if parts.scheme in ("redis", "rediss") and database and not ascii_digits(database):
            raise ValueError(f"not a Redis URL: its database must be a number, not {database!r}")
        return value

    @field_validator("lease_renew_seconds")
    @classmethod
    def _renewed_within_the_lease(cls, value: float, info: ValidationInfo) -> float:
        lease = info.data.get("lease_seconds")
        if lease is not None and value * 2 > lease:
            raise ValueError(
                f"must be at most half of STREAMQ_LEASE_SECONDS ({lease:g} s), so that a lease outlives "
                "one late renewal: a lease that lapses while its job runs fine lets another worker take it"
            )
        return value

    @field_validator("worker_ttl")
    @classmethod
    def _outlives_heartbeats(cls, value: float, info: ValidationInfo) -> float:
        interval = info.data.get("heartbeat_interval")
        if interval is not None and value < 2 * interval:
            raise ValueError(
                f"must be at least twice STREAMQ_HEARTBEAT_INTERVAL ({interval:g} s here), so that a live "
                "worker is never silent that long: a shorter one makes models come and go (404s, 503s). "
                "Where the workers beat faster, give this process their STREAMQ_HEARTBEAT_INTERVAL too"
            )
        return value

    @field_validator("redis_sentinels")
    @classmethod
    def _sentinels_parse(cls, value: str) -> str:
        parse_sentinels(value)
        return value

    def sentinel_addresses(self) -> list[tuple[str, int]]:
        return parse_sentinels(self.redis_sentinels)

    def replicas_to_wait_for(self) -> int:
        if self.redis_wait_replicas is not None:
            return self.redis_wait_replicas
        return 1 if self.sentinel_addresses() else 0

    def records_life(self) -> int:
        """Seconds a job's records (and its quota entry, its response's) live from its submit
        until its end sets them to ``result_ttl``: its longest wait, its longest run (its
        timeout counts from its first start, earlier runs and the gaps between included), then
        its result's time, which covers a job that ends just as that run's limit comes."""
        return self.queue_ttl + self.job_timeout + self.result_ttl

    def response_record_life(self) -> int:
        """Seconds a Responses record lives from its submit: longer than its job's records, by a
        run's timeout and a minute for each run a job may get, since a job handed back (a
        worker lost) can end past its records' first life, and its end renews only its own
        keys. The record is served only while its job exists: outliving it costs memory only."""
        return self.records_life() + self.max_attempts * (self.job_timeout + 60)

    def cache_path(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else Path.home() / ".cache" / "streamq"

    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]

    def model_list(self) -> list[str]:
        return [m.strip() for m in self.models.split(",") if m.strip()]
