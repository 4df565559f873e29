"""The playground in a real browser, against a real API: sign up, sessions, a streamed chat."""

import re
import time
import uuid

import httpx
from jose import jwt
from playwright.sync_api import Page, Request, expect

from morgana_devtools.openai_server import FakeOpenAIProcess
from morgana_devtools.processes import ApiProcess
from tests.api.sse import stream_chat
from tests.conftest import JWT_SECRET, STRONG_PASSWORD, bearer, new_session, register
from tests.playground.conftest import Steps, log_in, sign_up_with_a_session

# Collects every text the newest assistant bubble shows while it is still streaming.
RECORD_PARTIAL_REPLIES = """
() => {
  window.partialReplies = [];
  new MutationObserver(() => {
    const replies = document.querySelectorAll('[data-testid="message-assistant"]');
    const last = replies[replies.length - 1];
    if (last && last.classList.contains("streaming")) window.partialReplies.push(last.textContent);
  }).observe(document.getElementById("messages"), { subtree: true, childList: true, characterData: true });
}
"""


def test_register_chat_and_manage_sessions(
    page: Page, steps: Steps, playground_api: ApiProcess, fake_openai: FakeOpenAIProcess
) -> None:
    email = f"playground-{uuid.uuid4().hex[:10]}@example.com"
    page.goto(f"{playground_api.url}/playground")
    assert page.url == f"{playground_api.url}/playground/"
    expect(page).to_have_title("Morgana playground")
    expect(page.locator("#workspace")).to_be_hidden()  # nothing but the sign-in form yet
    steps.shot("opened")

    # Register.
    page.fill("#email", email)
    page.fill("#password", STRONG_PASSWORD)
    page.click("#register")
    expect(page.locator("#status")).to_have_text(f"Registered {email}")
    expect(page.locator("#workspace")).to_be_visible()
    expect(page.locator("#auth")).to_be_hidden()
    expect(page.locator("#who")).to_have_text(email)
    steps.shot("registered")

    # A session: created, listed, opened.
    page.click("#new-session")
    sessions = page.locator('[data-testid="session"]')
    expect(sessions).to_have_count(1)
    first_name = sessions.first.locator('[data-testid="session-name"]').inner_text()
    expect(page.locator("#session-title")).to_have_text(first_name)
    expect(page.locator("#chat")).to_be_visible()
    steps.shot("session-created")

    # A message, its reply rendered piece by piece as the stream arrives.
    fake_openai.set_scenario(delay_ms=120)  # one token at a time, seen apart
    page.evaluate(RECORD_PARTIAL_REPLIES)
    page.fill("#message", "hello from the playground")
    page.press("#message", "Enter")
    reply = page.locator('[data-testid="message-assistant"]').last
    expect(reply).to_have_class(re.compile(r"\bstreaming\b"))
    steps.shot("reply-streaming")
    expect(reply).to_have_text("You said: hello from the playground")
    expect(reply).not_to_have_class(re.compile(r"\bstreaming\b"))
    expect(page.locator("#status")).to_have_text("Reply complete")
    steps.shot("reply-complete")
    partial = [text for text in page.evaluate("window.partialReplies") if text]
    assert len(set(partial)) >= 3, partial  # shown as it came, not all at the end
    assert all("You said: hello from the playground".startswith(text) for text in partial), partial

    # The history, as the API stored it, after a reload of the page (tokens kept by the browser).
    page.reload()
    page.locator('[data-testid="session-name"]', has_text=first_name).click()
    messages = page.locator("#messages .message .text")
    expect(messages).to_have_text(["hello from the playground", "You said: hello from the playground"])
    expect(page.locator("#history-count")).to_have_text("2 stored")
    steps.shot("history")

    # Rename: Escape cancels; Enter saves, shown in the list and the title, and stored.
    page.click('[data-testid="session"] [data-testid="rename"]')
    page.fill('[data-testid="rename-input"]', "Not this one")
    page.press('[data-testid="rename-input"]', "Escape")
    expect(page.locator('[data-testid="session-name"]')).to_have_text([first_name])
    page.click('[data-testid="session"] [data-testid="rename"]')
    page.fill('[data-testid="rename-input"]', "Trip planning")
    page.press('[data-testid="rename-input"]', "Enter")
    expect(page.locator('[data-testid="session-name"]')).to_have_text(["Trip planning"])
    expect(page.locator("#session-title")).to_have_text("Trip planning")
    steps.shot("renamed")

    # A second session, then the first deleted: the list keeps only the second.
    page.click("#new-session")
    expect(sessions).to_have_count(2)
    second_name = page.locator("#session-title").inner_text()
    expect(page.locator("#messages .message")).to_have_count(0)
    steps.shot("second-session")
    page.locator('[data-testid="session"]', has_text="Trip planning").locator('[data-testid="delete"]').click()
    expect(page.locator("#status")).to_have_text("Deleted session Trip planning")
    expect(page.locator('[data-testid="session-name"]')).to_have_text([second_name])
    steps.shot("deleted")

    # What the API holds, through the public API: the page did what it showed.
    with httpx.Client(base_url=playground_api.url) as http:
        token = http.post("/api/v1/auth/login", data={"username": email, "password": STRONG_PASSWORD}).json()
        listed = http.get("/api/v1/auth/sessions", headers={"Authorization": f"Bearer {token['access_token']}"})
    assert [s["name"] for s in listed.json()] == [second_name]


# Puts a token in place of the one the page cached for a session, its expiry left as it was.
REPLACE_CACHED_TOKEN = """
([id, token]) => {
  const tokens = JSON.parse(localStorage.getItem("morgana.sessionTokens"));
  tokens[id].access_token = token;
  localStorage.setItem("morgana.sessionTokens", JSON.stringify(tokens));
}
"""


def test_a_session_created_elsewhere_is_opened_with_a_new_token(
    page: Page, steps: Steps, playground_api: ApiProcess, fake_openai: FakeOpenAIProcess
) -> None:
    # Another client (httpx here) signs up, creates a session and chats in it.
    email = f"playground-{uuid.uuid4().hex[:10]}@example.com"
    with httpx.Client(base_url=playground_api.url, timeout=30) as http:
        user_token = register(http, email)["token"]["access_token"]
        session = new_session(http, user_token)
        said = stream_chat(http, session["token"]["access_token"], "hello from elsewhere")
        assert said.status_code == 200 and said.last["done"], said.events
    session_id, elsewhere_token = session["session_id"], session["token"]["access_token"]
    token_path = f"/api/v1/auth/sessions/{session_id}/token"
    asked: list[str] = []  # every request of the page for a session's new token

    def watch(request: Request) -> None:
        if request.method == "POST" and request.url.endswith(token_path):
            asked.append(request.url)

    page.on("request", watch)

    # The page, logged in as that user: the session is listed.
    log_in(page, playground_api.url, email)
    expect(page.locator("#status")).to_have_text(f"Logged in as {email}")
    expect(page.locator('[data-testid="session-name"]')).to_have_text([session["name"]])
    assert asked == []  # listing needs no session token
    steps.shot("listed")

    # Opened: the page gets a session token for it, and shows what was said elsewhere.
    page.locator('[data-testid="session-name"]').click()
    expect(page.locator("#session-title")).to_have_text(session["name"])
    messages = page.locator("#messages .message .text")
    expect(messages).to_have_text(["hello from elsewhere", "You said: hello from elsewhere"])
    expect(page.locator("#history-count")).to_have_text("2 stored")
    assert len(asked) == 1
    steps.shot("history")

    # Chatted in from the page, in the same conversation as the other client's.
    page.fill("#message", "and now from the page")
    page.press("#message", "Enter")
    expect(page.locator('[data-testid="message-assistant"]').last).to_have_text("You said: and now from the page")
    expect(page.locator("#status")).to_have_text("Reply complete")
    expect(page.locator("#call")).to_be_enabled()
    assert len(asked) == 1  # the token fetched on opening, cached
    steps.shot("chatted")
    with httpx.Client(base_url=playground_api.url, timeout=30) as http:
        stored = http.get("/api/v1/chatbot/messages", headers=bearer(elsewhere_token)).json()["messages"]
    assert [m["content"] for m in stored] == [
        "hello from elsewhere",
        "You said: hello from elsewhere",
        "and now from the page",
        "You said: and now from the page",
    ]

    # The cached token refused (expired early, as the page sees it: a 401 although its expiry is
    # ahead): one new token, and the history and a chat turn go through.
    claims = jwt.get_unverified_claims(elsewhere_token)
    expired = jwt.encode({**claims, "iat": int(time.time()) - 7200, "exp": int(time.time()) - 3600}, JWT_SECRET)
    page.evaluate(REPLACE_CACHED_TOKEN, [session_id, expired])
    page.reload()
    page.locator('[data-testid="session-name"]').click()
    expect(messages).to_have_count(4)
    expect(page.locator("#history-count")).to_have_text("4 stored")
    assert len(asked) == 2
    page.fill("#message", "after a new token")
    page.press("#message", "Enter")
    expect(page.locator('[data-testid="message-assistant"]').last).to_have_text("You said: after a new token")
    expect(page.locator("#status")).to_have_text("Reply complete")
    assert len(asked) == 2
    steps.shot("recovered-from-401")


def test_a_failed_reply_is_shown(
    page: Page, steps: Steps, playground_api: ApiProcess, fake_openai: FakeOpenAIProcess
) -> None:
    sign_up_with_a_session(page, playground_api.url)
    fake_openai.set_scenario(fail_after=2, fail_mode="error_event")
    page.fill("#message", "this one breaks")
    page.press("#message", "Enter")
    expect(page.locator("#status")).to_have_class(re.compile(r"\berror\b"))
    # The stream's `event: error`, as the API sent it: its code and message.
    expect(page.locator("#status")).to_have_text(re.compile(r"^[a-z_]+: .+"))
    expect(page.locator('[data-testid="message-assistant"]').last).to_have_class(re.compile(r"\bfailed\b"))
    steps.shot("reply-failed")


def test_a_wrong_password_is_refused_on_the_page(page: Page, steps: Steps, playground_api: ApiProcess) -> None:
    log_in(page, playground_api.url, f"nobody-{uuid.uuid4().hex[:10]}@example.com")
    expect(page.locator("#status")).to_have_text("401: Incorrect email or password")
    expect(page.locator("#workspace")).to_be_hidden()
    steps.shot("refused")


# The answers to the page's requests for a session's history reach it a second late.
SLOW_HISTORY = """
() => {
  const fetchNow = window.fetch;
  window.fetch = (input, init) => {
    const slow = String(input).endsWith("/chatbot/messages") && (init?.method ?? "GET") === "GET";
    const answer = fetchNow(input, init);
    return slow ? answer.then((r) => new Promise((late) => setTimeout(() => late(r), 1000))) : answer;
  };
}
"""


def test_a_message_sent_while_the_history_loads_is_kept_after_it(
    page: Page, steps: Steps, playground_api: ApiProcess, fake_openai: FakeOpenAIProcess
) -> None:
    email = f"playground-{uuid.uuid4().hex[:10]}@example.com"
    with httpx.Client(base_url=playground_api.url, timeout=30) as http:
        session = new_session(http, register(http, email)["token"]["access_token"])
        assert stream_chat(http, session["token"]["access_token"], "said before").status_code == 200
    log_in(page, playground_api.url, email)
    expect(page.locator('[data-testid="session-name"]')).to_have_text([session["name"]])
    page.evaluate(SLOW_HISTORY)
    page.locator('[data-testid="session-name"]').click()
    page.fill("#message", "said at once")  # before the history has come
    page.press("#message", "Enter")
    expect(page.locator("#history-count")).to_have_text("2 stored")
    expect(page.locator('[data-testid="message-assistant"]').last).to_have_text("You said: said at once")
    expect(page.locator("#messages .message .text")).to_have_text(
        ["said before", "You said: said before", "said at once", "You said: said at once"]
    )
    steps.shot("history-then-new-turn")
