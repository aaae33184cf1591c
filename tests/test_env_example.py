"""`.env.example` lists every setting, and the example values load."""

from __future__ import annotations

import re
from pathlib import Path

from engine.config import ENV_PREFIX, Settings

EXAMPLE = Path(__file__).resolve().parent.parent / ".env.example"


def test_env_example_lists_every_setting() -> None:
    listed = set(re.findall(rf"^({ENV_PREFIX}[A-Z0-9_]+)=", EXAMPLE.read_text(), re.MULTILINE))
    expected = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    assert listed == expected


def test_env_example_values_are_valid() -> None:
    settings = Settings(_env_file=EXAMPLE)
    assert settings.projects[0].key == "ORCH"
    assert settings.projects[0].check_command == ["make", "check"]
    assert settings.plane_state_names["in_review"] == "In Review"
