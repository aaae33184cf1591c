"""The catalogs: every string people read exists in Russian and English."""

from __future__ import annotations

import pytest
from babel.messages.pofile import read_po

from engine.templating import LOCALES, LOCALES_DIR, text_environment


def catalog(locale: str):
    with (LOCALES_DIR / locale / "LC_MESSAGES" / "messages.po").open("rb") as handle:
        return read_po(handle, locale=locale)


def template_ids() -> set[str]:
    with (LOCALES_DIR / "messages.pot").open("rb") as handle:
        return {message.id for message in read_po(handle) if message.id}


@pytest.mark.parametrize("locale", LOCALES)
def test_every_extracted_string_is_translated(locale: str) -> None:
    translated = {m.id for m in catalog(locale) if m.id and m.string}
    assert template_ids() - translated == set()


def test_stage_labels_render_in_both_languages() -> None:
    labels = "{% from '_labels.j2' import stage_label %}{{ stage_label('review') }}"
    assert text_environment("ru").from_string(labels).render() == "Ревью"
    assert text_environment("en").from_string(labels).render() == "Review"
