// The Morgana API as a frontend sees it: plain fetch against /api/v1 on the page's own origin.
import { createParser, type EventSourceMessage } from "eventsource-parser";

const API = "/api/v1";

export interface Token {
  access_token: string;
  token_type: "bearer";
  expires_at: string;
}
export interface SessionInfo {
  session_id: string;
  name: string;
  created_at: string;
}
export interface NewSession {
  session_id: string;
  name: string;
  token: Token;
}
export interface StoredMessage {
  role: "user" | "assistant";
  content: string;
  created_at: string;
  channel: "chat" | "voice";
}
export interface LiveKitGrant {
  serverUrl: string;
  participantToken: string;
  roomName: string;
  participantIdentity: string;
}

/** A refused request: its HTTP status and the API's `detail` (or an SSE error's code). */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    message: string,
    readonly code?: string,
  ) {
    super(message);
  }
}

async function request<T>(method: string, path: string, token: string | null, body?: BodyInit, json = true): Promise<T> {
  const headers: Record<string, string> = {};
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined && json) headers["Content-Type"] = "application/json";
  const response = await fetch(API + path, { method, headers, body });
  if (!response.ok) throw await refusal(response);
  return (response.status === 204 ? undefined : await response.json()) as T;
}

async function refusal(response: Response): Promise<ApiError> {
  let detail = response.statusText;
  try {
    const body = await response.json();
    if (typeof body.detail === "string") detail = body.detail;
    else if (Array.isArray(body.detail)) detail = body.detail.map((d: { msg: string }) => d.msg).join("; ");
  } catch {
    // not JSON: keep the status text
  }
  return new ApiError(response.status, `${response.status}: ${detail}`);
}

export const register = (email: string, password: string) =>
  request<{ id: number; email: string; token: Token }>("POST", "/auth/register", null, JSON.stringify({ email, password }));

export const login = (email: string, password: string) =>
  request<Token>("POST", "/auth/login", null, new URLSearchParams({ username: email, password }), false);

export const listSessions = (userToken: string) => request<SessionInfo[]>("GET", "/auth/sessions", userToken);
export const createSession = (userToken: string) => request<NewSession>("POST", "/auth/session", userToken);
/** A new session token for one of the user's sessions (made elsewhere, or its token expired). */
export const newSessionToken = (userToken: string, id: string) =>
  request<NewSession>("POST", `/auth/sessions/${id}/token`, userToken);
export const renameSession = (userToken: string, id: string, name: string) =>
  request<SessionInfo>("PATCH", `/auth/sessions/${id}`, userToken, JSON.stringify({ name }));
export const deleteSession = (userToken: string, id: string) =>
  request<void>("DELETE", `/auth/sessions/${id}`, userToken);

export const history = (sessionToken: string) =>
  request<{ messages: StoredMessage[] }>("GET", "/chatbot/messages", sessionToken);
export const clearHistory = (sessionToken: string) => request<unknown>("DELETE", "/chatbot/messages", sessionToken);
export const livekitToken = (sessionToken: string) => request<LiveKitGrant>("POST", "/livekit/token", sessionToken);

export interface StreamOptions {
  /** Makes a retried turn count once (the history stores it at most once). */
  turnId?: string;
  /** Called before each attempt to pick a dropped stream up again (1, 2, ...). */
  onReconnecting?: (attempt: number) => void;
  signal?: AbortSignal;
}

// Waits before each attempt to pick a dropped stream up again; a failure after new events starts over.
const RECONNECT_DELAYS_MS = [250, 1000, 2500];

/** The connection went away (a network error, a body cut short, a gateway's 5xx), not a refusal. */
const dropped = (error: unknown) =>
  error instanceof TypeError || (error instanceof ApiError && (error.status === 0 || error.status >= 502));

/**
 * POST /chatbot/chat/stream and hand each piece of the reply to `onText` as it arrives.
 * EventSource cannot POST or send a bearer token, so the body is read with fetch and parsed
 * with eventsource-parser (which also skips `: ping` comments).
 * A connection lost before the `done` event is picked up again: GET /chatbot/chat/stream with
 * the id of the last event received (`Last-Event-ID`) sends the events after it, each once,
 * and the reply is not generated again. A 410 there (the stream is no longer kept) is thrown
 * as an ApiError: the history holds the turn if it was completed.
 * Resolves at the `done` event with the number of reconnections; rejects with an ApiError on
 * a refusal or an `error` event (a resumed stream can end with `reply_cancelled` or `stream_lost`).
 */
export async function streamChat(sessionToken: string, text: string, onText: (piece: string) => void, options: StreamOptions = {}): Promise<number> {
  const { turnId, onReconnecting, signal } = options;
  const headers = { Authorization: `Bearer ${sessionToken}`, Accept: "text/event-stream" };
  const seen: { lastEventId?: string } = {};
  try {
    const response = await fetch(`${API}/chatbot/chat/stream`, {
      method: "POST",
      headers: { ...headers, "Content-Type": "application/json" },
      body: JSON.stringify({ messages: [{ role: "user", content: text }], turn_id: turnId }),
      signal,
    });
    await readStream(response, onText, seen);
    return 0;
  } catch (error) {
    if (!dropped(error) || seen.lastEventId === undefined || signal?.aborted) throw error;
  }
  for (let attempt = 1, failures = 0; ; attempt++) {
    onReconnecting?.(attempt);
    await new Promise((resolve) => setTimeout(resolve, RECONNECT_DELAYS_MS[failures]));
    const from = seen.lastEventId as string;
    try {
      const response = await fetch(`${API}/chatbot/chat/stream`, { headers: { ...headers, "Last-Event-ID": from }, signal });
      await readStream(response, onText, seen);
      return attempt;
    } catch (error) {
      failures = seen.lastEventId === from ? failures + 1 : 0;
      if (!dropped(error) || failures >= RECONNECT_DELAYS_MS.length || signal?.aborted) throw error;
    }
  }
}

/** Read one SSE response to its `done` event, noting the id of each event in `seen`. */
async function readStream(response: Response, onText: (piece: string) => void, seen: { lastEventId?: string }): Promise<void> {
  if (!response.ok || !response.body) throw await refusal(response);
  let done = false;
  let failure: ApiError | null = null;
  const parser = createParser({
    onEvent(event: EventSourceMessage) {
      if (event.id) seen.lastEventId = event.id;
      const data = JSON.parse(event.data) as { content: string; done: boolean; error?: { code: string; message: string } };
      if (event.event === "error" || data.error) {
        const { code = "error", message = "the reply failed" } = data.error ?? {};
        failure = new ApiError(200, `${code}: ${message}`, code);
      } else if (data.content) {
        onText(data.content);
      }
      if (data.done) done = true;
    },
  });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  for (;;) {
    const { value, done: ended } = await reader.read();
    if (ended) break;
    parser.feed(value);
    if (failure) throw failure;
    if (done) {
      await reader.cancel();
      return;
    }
  }
  if (failure) throw failure;
  if (!done) throw new ApiError(0, "the stream ended before the reply was done");
}
