"""`morgana-api`: serve the API, or migrate its database (run before the API starts)."""

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from pydantic import ValidationError

from morgana.api.config import ApiSettings, ConfigurationError, service_password_problem
from morgana.core.logging import configure_logging
from morgana.core.multiprocess import prepare_multiprocess_dir, serve_metrics

log = logging.getLogger("morgana.api.cli")
MIGRATIONS = Path(__file__).parent / "migrations"


def load_settings() -> ApiSettings:
    """Settings, or a readable message and exit code 2 when they are missing or unsafe."""
    try:
        return ApiSettings()
    except (ValidationError, ConfigurationError) as exc:
        print(f"morgana-api: configuration error:\n{exc}", file=sys.stderr)
        raise SystemExit(2) from None


def migrate(settings: ApiSettings) -> None:
    """Bring the schema to the latest revision; create or update the service account."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", settings.sqlalchemy_url.replace("%", "%%"))
    command.upgrade(config, "head")
    log.info("database schema is up to date")
    if settings.api_user_email and settings.api_user_password:
        asyncio.run(_ensure_service_account(settings))


async def _ensure_service_account(settings: ApiSettings) -> None:
    from morgana.api.db import create_engine, create_session_factory
    from morgana.api.services.users import ensure_service_account

    assert settings.api_user_email and settings.api_user_password
    password = settings.api_user_password.get_secret_value()
    # Refused in development too: the account is reachable through the public login.
    if problem := service_password_problem(password):
        raise SystemExit(f"morgana-api: {problem}")
    engine = create_engine(settings)
    try:
        async with create_session_factory(engine)() as db:
            await ensure_service_account(db, settings.api_user_email, password)
    finally:
        await engine.dispose()


def serve(settings: ApiSettings, workers: int, reload: bool) -> None:
    if workers > 1:
        # gunicorn manages uvicorn workers; its config reads PORT and WEB_CONCURRENCY.
        os.environ["WEB_CONCURRENCY"] = str(workers)
        # This interpreter's gunicorn, whatever PATH holds; exec so that it gets the signals.
        # Its hooks prepare the metrics directory and serve METRICS_PORT.
        os.execv(
            sys.executable,
            [sys.executable, "-m", "gunicorn", "-c", "python:morgana.api.gunicorn_conf", "morgana.api.asgi:app"],
        )
    prepare_multiprocess_dir(clear=True)
    if settings.api_metrics_port:
        serve_metrics(settings.api_metrics_port, settings.host)
    import uvicorn

    uvicorn.run(
        "morgana.api.asgi:app",
        host=settings.host,
        port=settings.port,
        reload=reload,
        log_config=None,
        access_log=False,
        proxy_headers=True,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="morgana-api", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", help="apply database migrations and ensure the service account")
    serve_parser = sub.add_parser("serve", help="run the API")
    serve_parser.add_argument(
        "--workers",
        type=int,
        default=int(os.environ.get("WEB_CONCURRENCY", "1")),
        help="more than 1 runs gunicorn with uvicorn workers (default: WEB_CONCURRENCY or 1)",
    )
    serve_parser.add_argument("--reload", action="store_true", help="reload on code changes (dev)")
    sub.add_parser("check-config", help="validate the configuration and exit")
    args = parser.parse_args(argv)

    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format)
    if args.command == "migrate":
        migrate(settings)
    elif args.command == "serve":
        serve(settings, args.workers, args.reload)
    else:
        for problem in settings.unsafe_settings():
            print(f"warning: {problem}", file=sys.stderr)
        print("configuration ok")


if __name__ == "__main__":
    main()
