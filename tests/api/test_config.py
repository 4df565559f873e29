"""Start-up configuration: unsafe values refused outside development, every variable documented."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from morgana.api.config import ApiSettings, ConfigurationError

ROOT = Path(__file__).resolve().parents[2]
GOOD_SECRET = "k" * 16 + "3f9a" * 8
SAFE = {"jwt_secret_key": GOOD_SECRET, "openai_api_key": "sk-x", "_env_file": None}


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper() in {f.upper() for f in ApiSettings.model_fields}:
            monkeypatch.delenv(name)


@pytest.mark.parametrize("secret", ["", "secret", "change-me", "short-but-not-placeholder"])
def test_production_refuses_missing_placeholder_or_short_jwt_secrets(secret: str) -> None:
    with pytest.raises((ConfigurationError, ValidationError), match="JWT_SECRET_KEY"):
        ApiSettings(**{**SAFE, "environment": "production", "jwt_secret_key": secret})


def test_production_refuses_the_livekit_dev_secret_and_a_missing_model_key() -> None:
    with pytest.raises((ConfigurationError, ValidationError), match="LIVEKIT_API_SECRET"):
        ApiSettings(**SAFE, environment="production", livekit_api_key="devkey", livekit_api_secret="secret")
    with pytest.raises((ConfigurationError, ValidationError), match="OPENAI_API_KEY"):
        ApiSettings(**{**SAFE, "openai_api_key": None}, environment="staging")


def test_development_accepts_placeholders_but_still_lists_them() -> None:
    settings = ApiSettings(environment="development", jwt_secret_key="secret", _env_file=None)
    assert any("JWT_SECRET_KEY" in problem for problem in settings.unsafe_settings())


def test_production_with_safe_values_starts() -> None:
    settings = ApiSettings(**SAFE, environment="production")
    assert settings.unsafe_settings() == []


def test_bad_rate_limits_and_numbers_are_rejected() -> None:
    with pytest.raises(ValidationError, match="rate limit"):
        ApiSettings(**SAFE, rate_limit_chat="lots")
    with pytest.raises(ValidationError):
        ApiSettings(**SAFE, port=70000)


def test_database_url_from_parts_or_url() -> None:
    parts = ApiSettings(**SAFE, postgres_host="db", postgres_user="u", postgres_password="p@ss", postgres_db="m")
    assert parts.sqlalchemy_url == "postgresql+psycopg://u:p%40ss@db:5432/m"
    url = ApiSettings(**SAFE, database_url="postgresql://a:b@h:5433/d")
    assert url.sqlalchemy_url == "postgresql+psycopg://a:b@h:5433/d"


def test_cli_explains_bad_configuration_and_exits_2(tmp_path: Path) -> None:
    env = {
        "PATH": os.environ["PATH"],
        "ENVIRONMENT": "production",
        "JWT_SECRET_KEY": "secret",
        "OPENAI_API_KEY": "sk-x",
        "HOME": str(tmp_path),
    }
    result = subprocess.run(
        [sys.executable, "-m", "morgana.api.cli", "check-config"], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "JWT_SECRET_KEY" in result.stderr
    assert "openssl rand -hex 32" in result.stderr
    assert "Traceback" not in result.stderr


def test_env_example_documents_every_setting() -> None:
    documented = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", (ROOT / ".env.example").read_text(), re.M))
    from morgana.agent.config import AgentSettings
    from morgana_controller.config import ControllerSettings

    settings = {
        name.upper()
        for name in [*ApiSettings.model_fields, *AgentSettings.model_fields, *ControllerSettings.model_fields]
    }
    assert settings - documented == set()
    # And the variables the spec names for the whole system.
    assert {"MORGANA_BACKEND_URL", "API_USER_EMAIL", "API_USER_PASSWORD", "OPENAI_API_KEY"} <= documented


def test_the_agents_password_is_a_long_random_secret_without_character_classes() -> None:
    """`openssl rand -hex 16`, the chart README's recipe, is accepted; short or placeholder ones are not."""
    account = {**SAFE, "environment": "production", "api_user_email": "agent@example.com"}
    generated = subprocess.run(
        ["openssl", "rand", "-hex", "16"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert ApiSettings(**account, api_user_password=generated).unsafe_settings() == []
    for weak in ("Sh0rt_Passw0rd!", "changeme"):
        with pytest.raises((ConfigurationError, ValidationError), match=r"API_USER_PASSWORD .* openssl rand -hex 16"):
            ApiSettings(**account, api_user_password=weak)
    with pytest.raises((ConfigurationError, ValidationError), match="API_USER_EMAIL is set without API_USER_PASSWORD"):
        ApiSettings(**account)
