"""Settings shared by every deployable, read from the environment and `.env`."""

from enum import StrEnum

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Environment(StrEnum):
    DEVELOPMENT = "development"
    TEST = "test"
    STAGING = "staging"
    PRODUCTION = "production"


class CoreSettings(BaseSettings):
    """What every Morgana process needs: where it runs and how it logs."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    environment: Environment = Field(
        default=Environment.PRODUCTION,
        description="development relaxes secret checks; anything else enforces them.",
    )
    log_level: str = "INFO"
    log_format: str = Field(default="json", pattern="^(json|console)$")

    @property
    def is_development(self) -> bool:
        return self.environment == Environment.DEVELOPMENT
