"""A real browser (Debian's chromium, driven by the Python playwright package) on the playground
served by a real API process.

Chromium comes from the system (scripts/install-test-deps.sh); Playwright never downloads a
browser. Without chromium the browser tests skip, except under CI=true, where they fail: a green
CI run always means a browser drove the page.
"""

import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, Playwright, expect, sync_playwright

from morgana_devtools.processes import ApiProcess
from tests.conftest import STRONG_PASSWORD

ROOT = Path(__file__).resolve().parents[2]
# Screenshots of each step, per test (git-ignored): kept after the run for people to look at.
ARTIFACTS = ROOT / "test-artifacts" / "playground"
# Debian's wrapper script (/usr/bin/chromium) sources flag files that Playwright does not need.
CHROMIUM_CANDIDATES = ("/usr/lib/chromium/chromium", "chromium", "chromium-browser")


def find_chromium() -> str | None:
    if os.environ.get("CHROMIUM_BIN"):
        return os.environ["CHROMIUM_BIN"]
    for candidate in CHROMIUM_CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    return None


@pytest.fixture(scope="session")
def chromium_path() -> str:
    path = find_chromium()
    if path is None:
        message = "no chromium (apt-get install chromium, or scripts/install-test-deps.sh; or set CHROMIUM_BIN)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    # One at a time (Playwright's sync API cannot run twice at once in a process), and gone after
    # its module: while it runs, its event loop is the thread's, and asyncio.run() elsewhere fails.
    with sync_playwright() as running:
        yield running


@pytest.fixture(scope="module")
def browser(playwright: Playwright, chromium_path: str) -> Iterator[Browser]:
    browser = playwright.chromium.launch(executable_path=chromium_path, headless=True)
    yield browser
    browser.close()


@pytest.fixture(scope="session")
def playground_api(api_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiProcess]:
    env = {**api_env, "PLAYGROUND_ENABLED": "true"}
    with ApiProcess(env, tmp_path_factory.mktemp("playground-api") / "api.log") as process:
        yield process


class Steps:
    """Numbered screenshots of one test's steps, in test-artifacts/playground/<test>/."""

    def __init__(self, page: Page, directory: Path) -> None:
        self.page = page
        self.directory = directory
        self.count = 0
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)

    def shot(self, name: str) -> Path:
        self.count += 1
        path = self.directory / f"{self.count:02d}-{name}.png"
        self.page.screenshot(path=path, full_page=True)
        return path


@pytest.fixture
def page(browser: Browser, request: pytest.FixtureRequest) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1200, "height": 800})
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"uncaught: {error}"))

    def console(message: ConsoleMessage) -> None:
        # A refused request is the API's answer and is shown on the page; anything else the
        # browser logs as an error (a CSP violation, a script failure) is the page's fault.
        if message.type == "error" and "Failed to load resource" not in message.text:
            problems.append(f"console: {message.text}")

    page.on("console", console)
    page.set_default_timeout(15_000)
    yield page
    context.close()
    assert not problems, "the page reported errors:\n" + "\n".join(problems)


@pytest.fixture
def steps(page: Page, request: pytest.FixtureRequest) -> Iterator[Steps]:
    recorder = Steps(page, ARTIFACTS / re.sub(r"[^\w.-]", "_", request.node.name))
    yield recorder
    recorder.shot("last")  # where the test ended, passed or not


def log_in(page: Page, api_url: str, email: str, *, button: str = "#login") -> None:
    """Open the playground and sign in (`#register` to sign up) with the tests' password."""
    page.goto(f"{api_url}/playground/")
    page.fill("#email", email)
    page.fill("#password", STRONG_PASSWORD)
    page.click(button)


def sign_up_with_a_session(page: Page, api_url: str) -> str:
    """A new user, signed up on the page, with one session open and its (empty) history shown."""
    email = f"playground-{uuid.uuid4().hex[:10]}@example.com"
    log_in(page, api_url, email, button="#register")
    expect(page.locator("#auth")).to_be_hidden()
    page.click("#new-session")
    expect(page.locator('[data-testid="session"]')).to_have_count(1)
    expect(page.locator("#history-count")).to_have_text("0 stored")
    return email
