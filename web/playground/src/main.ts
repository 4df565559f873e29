// Morgana's playground: every screen of a frontend, on the public API only (./api.ts).
import * as api from "./api";
import { Call } from "./voice";

// --- state: the user token, and the session tokens this browser holds --------------------------
// A session's token comes with it when the page creates it (POST /auth/session); for any other of
// the user's sessions (created elsewhere, or its token expired) the page asks for a new one
// (POST /auth/sessions/{id}/token) when it is opened. Both are kept here until they expire.
const store = {
  get userToken(): string | null {
    return localStorage.getItem("morgana.userToken");
  },
  set userToken(token: string | null) {
    if (token) localStorage.setItem("morgana.userToken", token);
    else localStorage.removeItem("morgana.userToken");
  },
  get email(): string {
    return localStorage.getItem("morgana.email") ?? "";
  },
  set email(email: string) {
    localStorage.setItem("morgana.email", email);
  },
  sessionTokens(): Record<string, api.Token> {
    return JSON.parse(localStorage.getItem("morgana.sessionTokens") ?? "{}");
  },
  setSessionToken(id: string, token: api.Token | null) {
    const tokens = this.sessionTokens();
    if (token) tokens[id] = token;
    else delete tokens[id];
    localStorage.setItem("morgana.sessionTokens", JSON.stringify(tokens));
  },
  /** Forget the tokens of sessions no longer listed (deleted, or another user's). */
  keepSessionTokens(ids: string[]) {
    const tokens = this.sessionTokens();
    const kept = Object.fromEntries(ids.filter((id) => id in tokens).map((id) => [id, tokens[id]]));
    localStorage.setItem("morgana.sessionTokens", JSON.stringify(kept));
  },
  clear() {
    for (const key of ["morgana.userToken", "morgana.sessionTokens"]) localStorage.removeItem(key);
  },
};

let sessions: api.SessionInfo[] = [];
let current: api.SessionInfo | null = null;
let call: Call | null = null;

// --- DOM helpers ----------------------------------------------------------------------------------
const $ = <T extends HTMLElement = HTMLElement>(id: string) => document.getElementById(id) as T;

function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  props: Partial<HTMLElementTagNameMap[K]> & { testid?: string } = {},
  ...children: (Node | string)[]
): HTMLElementTagNameMap[K] {
  const { testid, ...rest } = props;
  const element = Object.assign(document.createElement(tag), rest);
  if (testid) element.dataset.testid = testid;
  element.append(...children);
  return element;
}

function status(text: string, error = false) {
  const line = $("status");
  line.textContent = text;
  line.classList.toggle("error", error);
}

/** Run an action from a click, showing its failure instead of throwing it away. */
function action(fn: () => Promise<void>): () => void {
  return () => {
    fn().catch((error: unknown) => status(error instanceof Error ? error.message : String(error), true));
  };
}

// --- session tokens ---------------------------------------------------------------------------------
const fetching = new Map<string, Promise<string>>();

/** The cached token of a session, unless it is missing or about to expire. */
function cachedSessionToken(id: string): string | undefined {
  const token = store.sessionTokens()[id];
  if (!token || Date.parse(token.expires_at) - Date.now() < 30_000) return undefined;
  return token.access_token;
}

/** A session's token: the cached one, else (or if `fresh`) a new one from the API. */
function sessionToken(id: string, fresh = false): Promise<string> {
  const cached = fresh ? undefined : cachedSessionToken(id);
  if (cached) return Promise.resolve(cached);
  let pending = fetching.get(id); // one request, however many callers ask at once
  if (!pending) {
    pending = fetchSessionToken(id).finally(() => fetching.delete(id));
    fetching.set(id, pending);
  }
  return pending;
}

async function fetchSessionToken(id: string): Promise<string> {
  try {
    const issued = await api.newSessionToken(store.userToken ?? "", id);
    store.setSessionToken(id, issued.token);
    return issued.token.access_token;
  } catch (error) {
    if (error instanceof api.ApiError && error.status === 401) userTokenRefused();
    else if (error instanceof api.ApiError && error.status === 404) action(showSignedIn)(); // gone: list again
    throw error;
  }
}

/**
 * Run `use` with the open session's token. A 401 means the cached token expired or was revoked:
 * it is dropped and `use` runs once more with a new one.
 */
async function withSessionToken<T>(use: (token: string) => Promise<T>): Promise<T> {
  if (!current) throw new Error("Open a session first");
  const id = current.session_id;
  try {
    return await use(await sessionToken(id));
  } catch (error) {
    if (!(error instanceof api.ApiError && error.status === 401)) throw error;
    store.setSessionToken(id, null);
    return await use(await sessionToken(id, true));
  }
}

// --- auth -------------------------------------------------------------------------------------------
async function authenticate(kind: "register" | "login") {
  const email = $<HTMLInputElement>("email").value.trim();
  const password = $<HTMLInputElement>("password").value;
  const token = kind === "register" ? (await api.register(email, password)).token : await api.login(email, password);
  store.userToken = token.access_token;
  store.email = email;
  status(kind === "register" ? `Registered ${email}` : `Logged in as ${email}`);
  await showSignedIn();
}

async function signOut() {
  await endCall();
  store.clear();
  current = null;
  sessions = [];
  render();
  status("Signed out (this browser forgot its tokens)");
}

async function showSignedIn() {
  await refreshSessions();
  render();
}

// --- sessions ---------------------------------------------------------------------------------------
async function refreshSessions() {
  const token = store.userToken;
  if (!token) return;
  try {
    sessions = await api.listSessions(token);
  } catch (error) {
    if (error instanceof api.ApiError && error.status === 401) userTokenRefused();
    throw error;
  }
  store.keepSessionTokens(sessions.map((s) => s.session_id));
  if (current && !sessions.some((s) => s.session_id === current?.session_id)) current = null;
}

/** The user token expired or was revoked: back to the sign-in form. */
function userTokenRefused() {
  store.userToken = null;
  render();
}

async function newSession() {
  const created = await api.createSession(store.userToken ?? "");
  store.setSessionToken(created.session_id, created.token);
  await refreshSessions();
  status(`Created session ${created.name}`);
  await select(created.session_id);
}

async function select(id: string) {
  if (call && current?.session_id !== id) await endCall();
  current = sessions.find((s) => s.session_id === id) ?? null;
  render();
  await loadHistory();
}

async function rename(session: api.SessionInfo, name: string) {
  const renamed = await api.renameSession(store.userToken ?? "", session.session_id, name);
  status(`Renamed to ${renamed.name}`);
  await refreshSessions();
  if (current?.session_id === renamed.session_id) current = renamed;
  render();
}

async function remove(session: api.SessionInfo) {
  if (current?.session_id === session.session_id) await endCall();
  await api.deleteSession(store.userToken ?? "", session.session_id);
  store.setSessionToken(session.session_id, null);
  status(`Deleted session ${session.name}`);
  await refreshSessions();
  render();
}

function sessionRow(session: api.SessionInfo): HTMLLIElement {
  const name = h("button", {
    className: "link",
    textContent: session.name,
    title: "Open",
    testid: "session-name",
    onclick: action(() => select(session.session_id)),
  });
  const row = h("li", { testid: "session" }, name);
  row.dataset.sessionId = session.session_id;
  row.classList.toggle("current", current?.session_id === session.session_id);

  const renameButton = h("button", { textContent: "Rename", testid: "rename" });
  renameButton.onclick = () => {
    const input = h("input", { value: session.name, maxLength: 100, testid: "rename-input", ariaLabel: "New name" });
    const form = h("form", { className: "inline" }, input, h("button", { type: "submit", textContent: "Save" }));
    form.onsubmit = (event) => {
      event.preventDefault();
      action(() => rename(session, input.value))();
    };
    input.onkeydown = (event) => {
      if (event.key === "Escape") render(); // cancel: the row as it was
    };
    row.replaceChildren(form);
    input.select();
  };
  const deleteButton = h("button", { textContent: "Delete", className: "danger", testid: "delete" });
  deleteButton.onclick = action(() => remove(session));
  row.append(renameButton, deleteButton);
  return row;
}

// --- chat -------------------------------------------------------------------------------------------
function bubble(role: string, text: string, note = ""): HTMLElement {
  const element = h("div", { className: `message ${role}`, testid: `message-${role}` }, h("span", { className: "text", textContent: text }));
  if (note) element.append(h("small", { textContent: note }));
  $("messages").append(element);
  element.scrollIntoView({ block: "end" });
  return element;
}

let historyLoads = 0;

async function loadHistory() {
  const load = ++historyLoads;
  $("messages").replaceChildren();
  $("history-count").textContent = "";
  if (!current) return;
  const { messages } = await withSessionToken(api.history);
  if (load !== historyLoads) return; // another session (or the same one again) was loaded meanwhile
  // A message sent while the history was on its way stays, after it.
  const sentMeanwhile = [...$("messages").children];
  $("messages").replaceChildren();
  for (const message of messages) bubble(message.role, message.content, message.channel === "voice" ? "voice" : "");
  $("messages").append(...sentMeanwhile);
  $("history-count").textContent = `${messages.length} stored`;
}

async function send(text: string) {
  if (!current) throw new Error("Create or open a session first");
  bubble("user", text);
  const reply = bubble("assistant", "");
  reply.classList.add("streaming");
  const span = reply.querySelector(".text") as HTMLElement;
  const input = $<HTMLInputElement>("message");
  input.disabled = true;
  // One id for the turn: if a refused token (401) makes it start afresh, it is stored once.
  const turnId = typeof crypto.randomUUID === "function" ? crypto.randomUUID() : undefined; // secure contexts only
  try {
    const reconnections = await withSessionToken((token) => {
      span.textContent = "";
      return api.streamChat(
        token,
        text,
        (piece) => {
          span.textContent += piece;
          reply.scrollIntoView({ block: "end" });
        },
        { turnId, onReconnecting: (attempt) => status(`Connection lost: reconnecting… (attempt ${attempt})`) },
      );
    });
    status(reconnections ? "Reply complete (reconnected after the connection dropped)" : "Reply complete");
  } catch (error) {
    if (error instanceof api.ApiError && error.status === 410) {
      // The stream is no longer kept: the history has the turn if it was completed.
      await loadHistory();
      status("The connection dropped and the reply's stream is gone: reloaded the history");
      return;
    }
    reply.classList.add("failed");
    throw error;
  } finally {
    reply.classList.remove("streaming");
    input.disabled = false;
    input.focus();
  }
}

// --- voice ------------------------------------------------------------------------------------------
async function startCall() {
  const grant = await withSessionToken(api.livekitToken);
  $("transcript").replaceChildren();
  const lines = new Map<string, HTMLElement>();
  call = new Call(
    {
      transcript({ id, speaker, text, final }) {
        let line = lines.get(id);
        if (!line) {
          line = h("div", { className: `message ${speaker === "you" ? "user" : "assistant"}`, testid: `transcript-${speaker}` });
          lines.set(id, line);
          $("transcript").append(line);
        }
        line.textContent = text;
        line.classList.toggle("partial", !final);
        line.scrollIntoView({ block: "end" });
      },
      agentState(state) {
        $("agent-state").textContent = state ?? "not in the room";
        $("agent-state").dataset.state = state ?? "";
      },
      speaking({ you, agent }) {
        $("you-speaking").classList.toggle("on", you);
        $("agent-speaking").classList.toggle("on", agent);
      },
      notice(text) {
        status(`Voice: ${text}`, true);
      },
      ended(reason) {
        call = null;
        renderCall();
        status(`Call ended (${reason})`);
        action(loadHistory)(); // the call's turns are stored in the session, marked voice
      },
    },
    $("call-audio"),
  );
  renderCall();
  status(`Joining ${grant.roomName}...`);
  try {
    await call.start(grant);
  } catch (error) {
    await endCall();
    throw error;
  }
  status(`In call (${grant.roomName}): speak, the agent answers`);
  renderCall();
}

async function endCall() {
  const ending = call;
  call = null;
  if (ending) await ending.stop();
  renderCall();
}

// --- rendering --------------------------------------------------------------------------------------
function renderCall() {
  const inCall = call !== null;
  $("call").textContent = inCall ? "End call" : "Start voice call";
  $("call").classList.toggle("danger", inCall);
  $("voice-live").hidden = !inCall;
  if (!inCall) $("agent-state").textContent = "not in the room";
}

function render() {
  const signedIn = store.userToken !== null;
  $("auth").hidden = signedIn;
  $("workspace").hidden = !signedIn;
  $("who").textContent = signedIn ? store.email : "";
  $("session-list").replaceChildren(...sessions.map(sessionRow));
  $("no-sessions").hidden = sessions.length > 0;
  $("chat").hidden = current === null;
  if (current) {
    $("session-title").textContent = current.name;
  }
  renderCall();
}

// --- wiring -----------------------------------------------------------------------------------------
$("register").onclick = action(() => authenticate("register"));
$<HTMLFormElement>("auth-form").onsubmit = (event) => {
  event.preventDefault();
  action(() => authenticate("login"))();
};
$("sign-out").onclick = action(signOut);
$("new-session").onclick = action(newSession);
$("refresh").onclick = action(async () => {
  await refreshSessions();
  render();
});
$("reload-history").onclick = action(loadHistory);
$("clear-history").onclick = action(async () => {
  await withSessionToken(api.clearHistory);
  await loadHistory();
  status("History cleared");
});
$<HTMLFormElement>("chat-form").onsubmit = (event) => {
  event.preventDefault();
  const input = $<HTMLInputElement>("message");
  const text = input.value.trim();
  if (!text) return;
  input.value = "";
  action(() => send(text))();
};
$("call").onclick = action(() => (call ? endCall() : startCall()));

render();
if (store.userToken) action(showSignedIn)();
