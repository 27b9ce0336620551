"""A stack with API keys on: a private Redis, a synthetic worker and two fronts.

Front ``a`` has the defaults of a keyed deployment (no CORS, no prompt logging), ``b`` allows one
CORS origin and logs prompts. Both share the keys, the quotas and limits (set small here, so that
each can be reached) and the Redis.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from harness.redis_server import RedisServer
from harness.services import Service, start_front, start_synthetic_worker, wait_workers

KEYS = {
    "alice": "sk-alice-3f9a1c7e",
    "alice2": "sk-alice-rotated-77b2",  # a second key named alice (rotation)
    "bob": "sk-bob-0c4e8d21a9",
    "dave": "sk-dave-91aa0f3c",
    "erin": "sk-erin-5d6e7f80",
    "frank": "sk-frank-2b3c4d5e",
    "gina": "sk-gina-8e9f0a1b",
    # Refused requests still count toward a key's rate: the limit tests have keys of their own.
    "ivan": "sk-ivan-3c4d5e6f",
    "judy": "sk-judy-7a8b9c0d",
    # The Idempotency-Key tests': a rate used up, and a withdrawn job.
    "kate": "sk-kate-1f2e3d4c",
    "lena": "sk-lena-9b8a7c6d",
}
FILE_KEY = ("carol", "sk-carol-from-file-1234")
MAX_CONCURRENT = 2
RATE = 12
RATE_SECONDS = 6
LIMITS = {
    "STREAMQ_MAX_BODY_BYTES": "4096",
    "STREAMQ_MAX_MESSAGES": "4",
    "STREAMQ_MAX_PROMPT_CHARS": "600",
    "STREAMQ_MAX_STOP_SEQUENCES": "2",
    "STREAMQ_MAX_STOP_CHARS": "10",
    "STREAMQ_MAX_TOKENS_LIMIT": "100",
}
ALLOWED_ORIGIN = "https://chat.example.com"
MODEL = "synth"


@dataclass
class SecureStack:
    redis: RedisServer
    logdir: Path
    a: str
    b: str
    services: list[Service] = field(default_factory=list)

    def logs(self) -> str:
        return "\n".join(f"===== {s.name}\n{s.log()}" for s in self.services)


def headers(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


def secure_stack(logdir: Path) -> Iterator[SecureStack]:
    redis_server = RedisServer()
    keys_file = logdir / "keys.txt"
    keys_file.write_text(f"# keys of the file\n{FILE_KEY[0]}:{FILE_KEY[1]}\n\n")
    plain = ",".join(f"{'alice' if name == 'alice2' else name}:{key}" for name, key in KEYS.items())
    env = {
        "STREAMQ_REDIS_URL": redis_server.url,
        "STREAMQ_API_KEYS": plain,
        "STREAMQ_API_KEYS_FILE": str(keys_file),
        "STREAMQ_KEY_MAX_CONCURRENT": str(MAX_CONCURRENT),
        "STREAMQ_KEY_RATE_LIMIT": f"{RATE} per {RATE_SECONDS} seconds",
        "STREAMQ_POSITION_POLL_INTERVAL": "0.1",
        **LIMITS,
    }
    services: list[Service] = []  # each one stopped below, whatever fails while they start
    try:
        services.append(
            start_synthetic_worker(env, logdir, MODEL, "secure-worker", tokens_per_second=50, slots=4)
        )
        front_a, url_a = start_front(env, logdir, "secure-a", log_level="info")
        services.append(front_a)
        env_b = env | {"STREAMQ_CORS_ORIGINS": ALLOWED_ORIGIN, "STREAMQ_LOG_PROMPTS": "1"}
        front_b, url_b = start_front(env_b, logdir, "secure-b", log_level="info")
        services.append(front_b)
        stack = SecureStack(redis_server, logdir, url_a, url_b, services)
        wait_workers(url_a, 1)
        yield stack
    finally:
        for service in services:
            service.stop()
        redis_server.close()
