"""Soak: mixed traffic against one API process for a while; its memory and open files must not grow.

    python -m bench.soak --minutes 30        # make bench SOAK_MINUTES=30 (default 3)

Clients register and log in, create sessions, stream and fetch chat turns, read and clear history,
ask for LiveKit tokens, and make the usual mistakes (a 401, a 422), as fast as the API answers.
After a warm-up the API's resident memory and open file descriptors are sampled every few
seconds; the verdict compares the last third of the samples with the first (a leak grows, a
warm cache does not). JSON lines on stdout, a table at the end. tests/drills runs a short soak
in `make test`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import secrets
import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
import psutil

from bench.common import cell, morgana_env, render_table, scratch_dir, start_services

PASSWORD = "Soak_Passw0rd!"


@dataclass
class SoakReport:
    seconds: float
    warmup: float
    requests: Counter = field(default_factory=Counter)  # (what, status) -> count
    samples: list[tuple[float, int, int]] = field(default_factory=list)  # (t, rss bytes, fds)

    @property
    def server_errors(self) -> int:
        return sum(n for (_, status), n in self.requests.items() if status >= 500)

    def _third(self, which: int) -> tuple[float, float]:
        """(RSS, open files) of the first or last third after the warm-up. RSS is the third's
        lowest sample: what the process holds between requests. A password check's argon2 work
        buffer (64 MiB) is in flight in some samples, more of them when the machine is slow; it
        once lifted a third's median by 60 MiB with no growth in the floor. A leak raises the floor."""
        after = [s for s in self.samples if s[0] >= self.warmup]
        third = max(1, len(after) // 3)
        part = after[:third] if which == 0 else after[-third:]
        return min(s[1] for s in part), statistics.median(s[2] for s in part)

    @property
    def rss_growth_mib(self) -> float:
        return (self._third(2)[0] - self._third(0)[0]) / 2**20

    @property
    def fd_growth(self) -> float:
        return self._third(2)[1] - self._third(0)[1]

    def summary(self) -> dict:
        first, last = self._third(0), self._third(2)
        return {
            "bench": "soak",
            "seconds": round(self.seconds, 1),
            "warmup_seconds": self.warmup,
            "requests": sum(self.requests.values()),
            "server_errors": self.server_errors,
            "server_errors_by_request": {
                f"{what} {status}": n for (what, status), n in self.requests.items() if status >= 500
            },
            "rss_mib_first_third": round(first[0] / 2**20, 1),
            "rss_mib_last_third": round(last[0] / 2**20, 1),
            "rss_growth_mib": round(self.rss_growth_mib, 1),
            "fds_first_third": first[1],
            "fds_last_third": last[1],
            "fd_growth": self.fd_growth,
            "samples": len(self.samples),
        }


def _client_loop(url: str, stop: threading.Event, report: SoakReport, lock: threading.Lock) -> None:
    def count(what: str, response: httpx.Response) -> httpx.Response:
        with lock:
            report.requests[(what, response.status_code)] += 1
        return response

    with httpx.Client(base_url=url, timeout=30) as http:
        email = f"soak-{secrets.token_hex(6)}@example.com"
        registered = count("register", http.post("/api/v1/auth/register", json={"email": email, "password": PASSWORD}))
        user_token = registered.json()["token"]["access_token"]
        user = {"Authorization": f"Bearer {user_token}"}
        voice_session = count("session", http.post("/api/v1/auth/session", headers=user)).json()
        rounds = 0
        while not stop.is_set():
            rounds += 1
            session = count("session", http.post("/api/v1/auth/session", headers=user)).json()
            bearer = {"Authorization": f"Bearer {session['token']['access_token']}"}
            body = {"messages": [{"role": "user", "content": f"soak round {rounds}"}]}
            with http.stream("POST", "/api/v1/chatbot/chat/stream", json=body, headers=bearer) as stream:
                for _ in stream.iter_lines():
                    pass
                count("chat_stream", stream)
            count("chat", http.post("/api/v1/chatbot/chat", json=body, headers=bearer))
            count("history", http.get("/api/v1/chatbot/messages", headers=bearer))
            count(
                "livekit",
                http.post(
                    "/api/v1/livekit/token",
                    headers={"Authorization": f"Bearer {voice_session['token']['access_token']}"},
                ),
            )
            count("sessions", http.get("/api/v1/auth/sessions", headers=user))
            count("bad_token", http.get("/api/v1/chatbot/messages", headers={"Authorization": "Bearer nope"}))
            count("invalid", http.post("/api/v1/chatbot/chat", json={"messages": []}, headers=bearer))
            if rounds % 5 == 0:
                count("login", http.post("/api/v1/auth/login", data={"username": email, "password": PASSWORD}))
                count("clear", http.delete("/api/v1/chatbot/messages", headers=bearer))
                count("delete_session", http.delete(f"/api/v1/auth/sessions/{session['session_id']}", headers=user))


def soak(
    url: str, pid: int, seconds: float, clients: int = 4, warmup: float = 30.0, sample_every: float = 5.0
) -> SoakReport:
    """Mixed traffic from `clients` threads for `seconds`, sampling process `pid`."""
    report = SoakReport(seconds=seconds, warmup=warmup)
    stop, lock = threading.Event(), threading.Lock()
    threads = [
        threading.Thread(target=_client_loop, args=(url, stop, report, lock), daemon=True) for _ in range(clients)
    ]
    process = psutil.Process(pid)
    started = time.monotonic()
    for thread in threads:
        thread.start()
    while (elapsed := time.monotonic() - started) < seconds:
        report.samples.append((elapsed, process.memory_info().rss, process.num_fds()))
        time.sleep(sample_every)
    stop.set()
    for thread in threads:
        thread.join(60)
    return report


def main(argv: list[str] | None = None) -> int:
    from morgana_devtools.processes import ApiProcess, migrate

    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="how long the traffic runs (default 3)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    args = parser.parse_args(argv)
    seconds = args.minutes * 60
    key = "sk-soak-" + secrets.token_hex(8)
    with contextlib.ExitStack() as stack:
        workdir = scratch_dir(stack, "morgana-soak-")
        pg, valkey, fake = start_services(stack, workdir, key)
        fake.set_scenario(tokens=20, delay_ms=5)
        # LiveKit tokens are signed here; no LiveKit server is needed for them.
        env = {
            **morgana_env(pg, valkey, fake, key),
            "LIVEKIT_API_KEY": "APIsoak",
            "LIVEKIT_API_SECRET": secrets.token_hex(32),
        }
        migrate(env)
        api = ApiProcess(env, workdir / "api.log", workers=1)
        stack.callback(api.stop)
        api.start()
        assert api.process is not None
        report = soak(api.url, api.process.pid, seconds, clients=args.clients, warmup=min(30.0, seconds / 4))
    summary = report.summary()
    print(json.dumps(summary))
    rows = [("what", "value")] + [(k, cell(v)) for k, v in summary.items() if k != "bench"]
    print(render_table(rows, left=(0,)))
    return 0 if report.server_errors == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
