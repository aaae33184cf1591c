"""Typed configuration: `ORCH_*` environment variables and a `.env` file.

Every setting is listed, with a comment, in `.env.example`. A bad value stops
start-up with one line naming the variable (see `describe_errors`).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from engine.agents import DEFAULT_AGENT_COMMAND

ENV_PREFIX = "ORCH_"

DEFAULT_PLANE_STATE_NAMES: dict[str, str] = {
    "in_progress": "In Progress",
    "in_review": "In Review",
    "needs_input": "Needs Input",
    "approved": "Approved",
    "rejected": "Rejected",
    "blocked": "Blocked",
    "done": "Done",
    "architecture": "Architecture",
    "development": "Development",
    "review": "Review",
    "testing": "Testing",
    "deploy": "Deploy",
}


class ProjectConfig(BaseModel):
    key: str = Field(pattern=r"^[A-Z][A-Z0-9]{0,15}$")
    remote: str = Field(min_length=1)
    main_branch: str = "main"
    plane_project_id: str | None = None
    repo: str | None = None
    check_command: list[str] | None = None
    # On the forge, wait for CI statuses on each head; false for a repository without CI.
    forge_ci: bool = True

    @field_validator("check_command", mode="before")
    @classmethod
    def _split_command(cls, value: Any) -> Any:
        if isinstance(value, str):
            return shlex.split(value) or None
        return value


def _comma_list(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        env_ignore_empty=True,
        extra="ignore",
    )

    # Telegram
    telegram_token: SecretStr | None = None
    telegram_api_base: str = "https://api.telegram.org"
    telegram_chat_id: int | None = None
    telegram_admin_ids: Annotated[list[int], NoDecode] = Field(default_factory=list)
    telegram_webhook_url: str | None = None
    tracker_mode: Literal["edit", "bump"] = "edit"
    locale: Literal["ru", "en"] = "ru"
    telegram_pace_s: float | None = Field(default=None, ge=0)
    telegram_debounce_s: float = Field(default=1.0, ge=0)

    # process
    db_path: Path = Path("data/conveyor.db")
    workdir: Path = Path("data/work")
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8080, ge=0, le=65535)
    api_token: SecretStr | None = None
    job_lease_s: float = Field(default=60.0, gt=0)

    # projects
    projects: list[ProjectConfig] = Field(default_factory=list)

    # agents
    agent_command: str = DEFAULT_AGENT_COMMAND
    agent_timeout_s: float = Field(default=1800.0, gt=0)
    agent_max_attempts: int = Field(default=2, ge=1)
    agent_retry_backoff_s: float = Field(default=5.0, ge=0)
    max_concurrency: int = Field(default=1, ge=1)
    max_developer_retries: int = Field(default=3, ge=1)

    # Plane
    plane_api_url: str | None = None
    plane_web_url: str | None = None
    plane_api_token: SecretStr | None = None
    plane_workspace: str | None = None
    plane_webhook_secret: SecretStr | None = None
    plane_state_names: dict[str, str] = Field(
        default_factory=lambda: dict(DEFAULT_PLANE_STATE_NAMES)
    )
    plane_bot_analyst: SecretStr | None = None
    plane_bot_architect: SecretStr | None = None
    plane_bot_developer: SecretStr | None = None
    plane_bot_reviewer: SecretStr | None = None
    plane_bot_tester: SecretStr | None = None
    plane_bot_deployer: SecretStr | None = None

    # Gitea
    gitea_url: str | None = None
    gitea_public_url: str | None = None
    gitea_token: SecretStr | None = None
    gitea_webhook_secret: SecretStr | None = None
    allow_unsigned_webhooks: bool = False

    # reconciler
    reconcile_enabled: bool = True
    reconcile_plane_enabled: bool = True
    reconcile_skip_blocked_enabled: bool = True
    reconcile_interval_s: float = Field(default=30.0, gt=0)
    reconcile_grace_s: float = Field(default=120.0, ge=0)
    reconcile_stage_grace_s: dict[str, float] = Field(default_factory=dict)

    # merge and deploy
    merge_gate_enabled: bool = True
    merge_gate_repos: Annotated[list[str], NoDecode] = Field(default_factory=list)
    merge_lease_ttl_s: float = Field(default=1800.0, gt=0)
    merge_defer_s: float = Field(default=10.0, ge=0)
    merge_retry_s: float = Field(default=5.0, ge=0)
    deploy_hook_timeout_s: float = Field(default=900.0, gt=0)
    deploy_staging_hook: str | None = None
    deploy_hook: str | None = None
    healthcheck_url: str | None = None
    healthcheck_tries: int = Field(default=10, ge=1)
    healthcheck_interval_s: float = Field(default=6.0, ge=0)

    # outbound sync to Plane and Gitea
    plane_timeout_s: float = Field(default=15.0, gt=0)
    tracker_retry_base_s: float = Field(default=5.0, gt=0)
    tracker_retry_max_s: float = Field(default=600.0, gt=0)

    @field_validator("telegram_admin_ids", "merge_gate_repos", mode="before")
    @classmethod
    def _split_lists(cls, value: Any) -> Any:
        return _comma_list(value)

    @field_validator("plane_state_names", mode="after")
    @classmethod
    def _fill_state_names(cls, value: dict[str, str]) -> dict[str, str]:
        return {**DEFAULT_PLANE_STATE_NAMES, **value}

    @field_validator("projects", mode="after")
    @classmethod
    def _unique_keys(cls, value: list[ProjectConfig]) -> list[ProjectConfig]:
        keys = [project.key for project in value]
        duplicates = sorted({key for key in keys if keys.count(key) > 1})
        if duplicates:
            raise ValueError(f"duplicate project key {', '.join(duplicates)}")
        return value

    def project(self, key: str) -> ProjectConfig | None:
        return next((p for p in self.projects if p.key == key), None)


class ConfigError(Exception):
    """A setting is missing or invalid; the message names the variable."""


def describe_errors(error: ValidationError) -> list[str]:
    """One line per problem, naming the environment variable (never its value)."""
    lines = []
    for item in error.errors():
        loc = [str(part) for part in item["loc"]]
        variable = ENV_PREFIX + loc[0].upper() if loc else ENV_PREFIX
        where = "".join(f"[{part}]" if part.isdigit() else f".{part}" for part in loc[1:])
        message = item["msg"]
        if item["type"] == "missing":
            message = "is required"
        lines.append(f"{variable}{where}: {message}")
    return lines


def load_settings(**overrides: Any) -> Settings:
    """Read the settings, turning validation errors into a ConfigError naming each variable."""
    try:
        return Settings(**overrides)
    except ValidationError as error:
        raise ConfigError("; ".join(describe_errors(error))) from None


def require(settings: Settings, *names: str) -> None:
    """Fail with a ConfigError when a setting that this command needs is unset."""
    missing = [ENV_PREFIX + name.upper() for name in names if not getattr(settings, name)]
    if missing:
        raise ConfigError("; ".join(f"{name}: is required" for name in missing))


def dump_projects(projects: list[ProjectConfig]) -> str:
    return json.dumps([project.model_dump(exclude_none=True) for project in projects])
