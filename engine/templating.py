"""Jinja2 environments for prompts and for what people read.

Templates render with StrictUndefined: a missing variable fails loudly instead
of sending an agent an empty prompt or a person an empty card. Translations come
from the gettext catalogs under `locales/`, compiled in memory at start-up from
the `.po` files, so no build step is needed before running.
"""

from __future__ import annotations

import gettext
import io
from functools import cache
from pathlib import Path

import jinja2
from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES_DIR = ROOT / "templates"
LOCALES_DIR = ROOT / "locales"
DOMAIN = "messages"
LOCALES = ("ru", "en")


@cache
def translations(locale: str) -> gettext.NullTranslations:
    """The catalog for a locale; English is the msgid language, so a missing entry reads as is."""
    po_path = LOCALES_DIR / locale / "LC_MESSAGES" / f"{DOMAIN}.po"
    if not po_path.exists():
        return gettext.NullTranslations()
    with po_path.open("rb") as handle:
        catalog = read_po(handle, locale=locale)
    buffer = io.BytesIO()
    write_mo(buffer, catalog)
    buffer.seek(0)
    return gettext.GNUTranslations(buffer)


def _base(autoescape: bool) -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        undefined=jinja2.StrictUndefined,
        autoescape=autoescape,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        extensions=["jinja2.ext.i18n"],
    )


def prompt_environment() -> jinja2.Environment:
    """Role instructions: markdown for agents, English, no escaping."""
    env = _base(autoescape=False)
    env.install_null_translations(newstyle=True)
    return env


def text_environment(locale: str, html: bool = False) -> jinja2.Environment:
    """Text for people (console, Telegram) in the given locale; HTML-escaped when `html`."""
    env = _base(autoescape=html)
    env.policies["ext.i18n.trimmed"] = True
    env.install_gettext_translations(translations(locale), newstyle=True)
    env.filters["tokens"] = format_tokens
    env.filters["usd"] = format_usd
    env.filters["duration"] = format_duration
    return env


def format_tokens(value: int | None) -> str:
    if value is None:
        return "—"
    if value >= 1_000_000:
        return f"{value / 1_000_000:.1f}M"
    if value >= 10_000:
        return f"{value / 1000:.0f}k"
    if value >= 1000:
        return f"{value / 1000:.1f}k"
    return str(value)


def format_usd(value: float | None) -> str:
    return "—" if value is None else f"${value:.2f}"


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 10:
        return f"{seconds:.1f}s"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
