from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from harness.redis_server import RedisServer
from harness.services import Service, start_front, start_worker, wait_workers
from tests.secure_stack import SecureStack, secure_stack

if TYPE_CHECKING:
    import openai

    from worker.batch_lm import BatchedCausalLM


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's own tiny model, built once per test session (random weights, local tokenizer)."""
    from worker.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "streamq-tiny")


@pytest.fixture(scope="session")
def hd64_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with heads of 64 dimensions (vLLM's CPU attention takes no fewer than 32),
    for the vLLM tests; built once per test session."""
    from worker.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "vllm-tiny", shape="tiny-hd64")


@pytest.fixture(scope="session")
def tiny_backend(tiny_model: Path) -> Any:
    """The tiny model loaded in this process, as the workers load it (CPU, float32, 1 thread)."""
    import torch

    from worker.model_loading import load_backend

    torch.set_num_threads(1)
    return load_backend(str(tiny_model), device="cpu", dtype="float32")


@pytest.fixture
def batched(tiny_backend: Any) -> BatchedCausalLM:
    """The batching engine's model over the tiny backend: 4 slots, 512 positions, 16-token chunks."""
    from worker.batch_lm import BatchedCausalLM

    return BatchedCausalLM(tiny_backend, slots=4, max_len=512, prefill_chunk=16)


LONG_TOKENS = 1500
STACK_SLOTS = 2  # jobs each of the stack's two workers runs at once
STACK_CAPACITY = 2 * STACK_SLOTS


@pytest.fixture(scope="session")
def long_prompts(tiny_backend: Any) -> list[str]:
    """Prompts whose greedy answer runs the full LONG_TOKENS (no early end of sequence): jobs
    that keep a worker busy for a while, checked here rather than assumed."""
    from shared.schemas import ChatMessage, GenerationRequest

    found = []
    for i in range(20):
        prompt = f"keep talking {i}"
        req = GenerationRequest(
            messages=[ChatMessage(role="user", content=prompt)],
            max_tokens=LONG_TOKENS,
            temperature=0.0,
            top_p=1.0,
        )
        if list(tiny_backend.generate(req))[-1].finish_reason == "length":
            found.append(prompt)
        if len(found) == 3:
            return found
    pytest.fail("the tiny model ended every candidate prompt early")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    try:
        yield server
    finally:
        server.close()


@dataclass
class Stack:
    """Two fronts and two workers (STACK_SLOTS slots each) on one private Redis, all real processes."""

    redis: RedisServer
    model_dir: Path
    env: dict[str, str]
    logdir: Path
    url: str
    url2: str
    services: list[Service] = field(default_factory=list)

    def logs(self) -> str:
        return "\n".join(f"===== {s.name}\n{s.log()[-4000:]}" for s in self.services)


@pytest.fixture
def retire_extra_workers(stack: Stack) -> Iterator[None]:
    """Workers a test adds to the shared stack (other models, crash tests) are stopped after it,
    and gone from the directory (a killed one's heartbeat ages out), so that the tests after it
    see the stack's one served model again."""
    import httpx

    from harness.services import wait_for

    before = len(stack.services)
    yield
    extra, stack.services[before:] = stack.services[before:], []
    for service in extra:
        service.stop()

    def only_the_stacks_model() -> bool:
        models = httpx.get(f"{stack.url}/v1/models", timeout=5).json()["data"]
        return [m["id"] for m in models] == [stack.model_dir.name]

    if extra:
        wait_for(only_the_stacks_model, 60, "the test's extra workers to leave the directory")


@pytest.fixture(scope="session")
def stack(
    redis_server: RedisServer, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    logdir = tmp_path_factory.mktemp("logs")
    env = {
        "STREAMQ_REDIS_URL": redis_server.url,
        "STREAMQ_TORCH_THREADS": "1",
        "STREAMQ_SLOTS": str(STACK_SLOTS),
        "STREAMQ_POSITION_POLL_INTERVAL": "0.1",
        "STREAMQ_PING_INTERVAL": "0.5",
    }
    services: list[Service] = []  # each one stopped below, whatever fails while they start
    try:
        services += [start_worker(env, logdir, str(tiny_model), f"worker-{i}") for i in (1, 2)]
        front1, url1 = start_front(env, logdir, "front-1")
        services.append(front1)
        front2, url2 = start_front(env, logdir, "front-2")
        services.append(front2)
        stack = Stack(redis_server, tiny_model, env, logdir, url1, url2, services)
        try:
            wait_workers(url1, 2)
        except TimeoutError:
            pytest.fail("the workers did not come up:\n" + stack.logs())
        yield stack
    finally:
        for service in services:
            service.stop()


def openai_client(url: str, key: str = "x") -> openai.OpenAI:
    """The openai SDK on a front, as a user makes it, without its retries (a test sees each answer)."""
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)


@pytest.fixture
def client(stack: Stack) -> Iterator[openai.OpenAI]:
    """The openai SDK on the stack's first front."""
    with openai_client(stack.url) as c:
        yield c


@pytest.fixture
def client2(stack: Stack) -> Iterator[openai.OpenAI]:
    """The openai SDK on the stack's other front."""
    with openai_client(stack.url2) as c:
        yield c


@pytest.fixture(scope="session")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureStack]:
    """Fronts with API keys, quotas and small limits (see tests/secure_stack.py)."""
    yield from secure_stack(tmp_path_factory.mktemp("secure"))


# ----- clients (issue 8): a front with an API key and a slow synthetic worker ---------------------
CLIENT_API_KEY = "sk-streamq-clients-test"
SLOW_MODEL = "synth"
SLOW_TOKENS_PER_SECOND = 20
SLOW_SLOTS = 4


@dataclass
class SlowStack:
    """A private Redis, one front started with an API key, and a synthetic worker that writes
    SLOW_TOKENS_PER_SECOND words a second: answers that run long enough to be stopped mid-way."""

    redis: RedisServer
    env: dict[str, str]
    logdir: Path
    url: str
    api_key: str = CLIENT_API_KEY
    model: str = SLOW_MODEL

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def job(self, job_id: str) -> dict[str, Any]:
        """The job's view, as the API shows it to its key."""
        import httpx

        r = httpx.get(f"{self.url}/v1/jobs/{job_id}", headers=self.headers, timeout=10)
        assert r.status_code == 200, r.text
        return dict(r.json())

    def asked(self, job_id: str) -> list[tuple[str, str]]:
        """The conversation a job was given, as its worker read it."""
        from shared import keys
        from shared.schemas import GenerationRequest

        stored = self.redis.client(decode_responses=True).hget(keys.job(job_id), "request")
        assert isinstance(stored, str)
        return [(m.role, m.content) for m in GenerationRequest.model_validate_json(stored).messages]

    def fill_slots(self) -> list[str]:
        """Start a long job in each of the worker's slots (running before this returns), so the
        next job waits in the queue; the jobs' ids, for ``cancel``."""
        import httpx

        from harness.services import wait_for

        body = {"model": self.model, "prompt": "block", "max_tokens": 120 * SLOW_TOKENS_PER_SECOND}
        with httpx.Client(base_url=self.url, headers=self.headers, timeout=10) as http:
            ids = [http.post("/v1/jobs", json=body).json()["id"] for _ in range(SLOW_SLOTS)]
            wait_for(
                lambda: all(http.get(f"/v1/jobs/{i}").json()["status"] == "running" for i in ids),
                30,
                "the blocking jobs to run",
            )
        return ids

    def cancel(self, job_ids: list[str]) -> None:
        import httpx

        for job_id in job_ids:
            httpx.post(f"{self.url}/v1/jobs/{job_id}/cancel", headers=self.headers, timeout=30)


@pytest.fixture(scope="session")
def slow_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlowStack]:
    import httpx

    from harness.services import start_synthetic_worker, wait_for

    server = RedisServer()
    logdir = tmp_path_factory.mktemp("slow-logs")
    env = {
        "STREAMQ_REDIS_URL": server.url,
        "STREAMQ_API_KEYS": CLIENT_API_KEY,
        "STREAMQ_POSITION_POLL_INTERVAL": "0.1",
        "STREAMQ_PING_INTERVAL": "0.5",
        "STREAMQ_DRAIN_SECONDS": "0",
    }
    worker = start_synthetic_worker(env, logdir, SLOW_MODEL, "slow-1", SLOW_TOKENS_PER_SECOND, SLOW_SLOTS)
    services = [worker]
    try:
        front, url = start_front(env, logdir, "slow-front")
        services.append(front)
        auth = {"Authorization": f"Bearer {CLIENT_API_KEY}"}

        def served() -> bool:
            r = httpx.get(f"{url}/v1/models", headers=auth, timeout=5)
            return SLOW_MODEL in [m["id"] for m in r.json()["data"]]

        wait_for(served, 60, "the synthetic worker")
        yield SlowStack(server, env, logdir, url)
    finally:
        for service in services:
            service.stop()
        server.close()


# The web chat page's tests (tests/web_page.py drives the page): headless Chromium, Debian's.
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@pytest.fixture
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service as DriverService

    options = Options()
    options.binary_location = shutil.which("chromium") or CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-background-networking",
        "--disable-dev-shm-usage",
    ):
        options.add_argument(arg)
    options.add_argument("--window-size=1100,760")
    driver_service = DriverService(shutil.which("chromedriver") or CHROMEDRIVER)
    driver = webdriver.Chrome(service=driver_service, options=options)
    try:
        yield driver
    finally:
        driver.quit()
