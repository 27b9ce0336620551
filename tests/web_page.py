"""Driving the web chat page in headless Chromium (Debian's chromium + chromium-driver, through
selenium), as its tests do: opening the page on a stack, asking, reading the answers."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

if TYPE_CHECKING:
    from tests.conftest import SlowStack


PAGE_MARKS = [  # the page's tests: end to end, and only where Chromium is
    pytest.mark.e2e,
    pytest.mark.skipif(
        not (shutil.which("chromium") and shutil.which("chromedriver")),
        reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
    ),
]


T = TypeVar("T")


def until(driver: Any, condition: Callable[[], T], what: str, timeout: float = 30) -> T:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(
        driver, timeout, poll_frequency=0.05, ignored_exceptions=[StaleElementReferenceException]
    )
    try:
        return wait.until(lambda _: condition())
    except Exception as exc:
        raise AssertionError(f"timed out waiting for {what}") from exc


def answers(driver: Any) -> list[Any]:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, "#log .msg.assistant")


def text_of(element: Any) -> str:
    from selenium.webdriver.common.by import By

    return str(element.find_element(By.CSS_SELECTOR, ".body").get_attribute("textContent"))


def state_of(element: Any) -> str | None:
    return element.get_attribute("data-state")


def open_page(driver: Any, slow: SlowStack, url: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver.get(f"{url}/")
    key = driver.find_element(By.ID, "api-key")
    key.clear()
    key.send_keys(slow.api_key, Keys.TAB)  # kept in local storage; the model list reloads with it
    models = "return Array.from(document.querySelectorAll('#model option'), (o) => o.value)"
    until(driver, lambda: slow.model in driver.execute_script(models), "the model list")


def open_on(driver: Any, slow: SlowStack, model: str, wait: float = 60) -> None:
    """The page, once ``model`` is served, with it picked (a worker started by the test)."""
    import httpx

    from harness.services import wait_for

    def served() -> bool:
        models = httpx.get(f"{slow.url}/v1/models", headers=slow.headers, timeout=10)
        return model in [m["id"] for m in models.json()["data"]]

    wait_for(served, wait, f"a worker serving {model}")
    open_page(driver, slow, slow.url)
    driver.execute_script(
        "const s = document.getElementById('model');"
        "if (![...s.options].some((o) => o.value === arguments[0])) s.add(new Option(arguments[0]));"
        "s.value = arguments[0];",
        model,
    )


def ask(driver: Any, question: str, max_tokens: int) -> Any:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    count = len(answers(driver))
    field = driver.find_element(By.ID, "max-tokens")
    field.clear()
    field.send_keys(str(max_tokens))
    box = driver.find_element(By.ID, "question")
    box.send_keys(question, Keys.ENTER)
    return until(driver, lambda: len(answers(driver)) > count and answers(driver)[-1], "the answer bubble")
