"""The catalogs: every string people read exists in Russian and English."""

from __future__ import annotations

import pytest
from babel.messages.extract import extract_from_dir
from babel.messages.frontend import parse_mapping_cfg
from babel.messages.pofile import read_po

from engine.templating import LOCALES, LOCALES_DIR, ROOT, text_environment


def catalog(locale: str):
    with (LOCALES_DIR / locale / "LC_MESSAGES" / "messages.po").open("rb") as handle:
        return read_po(handle, locale=locale)


def template_ids() -> set[str]:
    with (LOCALES_DIR / "messages.pot").open("rb") as handle:
        return {message.id for message in read_po(handle) if message.id}


def singular(msgid: str | tuple[str, ...]) -> str:
    """A plural entry's id is (singular, plural); the singular names it."""
    return msgid if isinstance(msgid, str) else msgid[0]


def source_ids() -> dict[str, str]:
    """Every msgid in the sources, as `make locales` extracts them (babel.cfg), with its file."""
    with (ROOT / "babel.cfg").open() as handle:
        method_map, options_map = parse_mapping_cfg(handle)
    found = {}
    for filename, _, message, _, _ in extract_from_dir(ROOT, method_map, options_map):
        found.setdefault(singular(message), filename)
    return found


def test_the_template_catalog_has_every_string_of_the_sources() -> None:
    known = {singular(msgid) for msgid in template_ids()}
    missing = {msgid: where for msgid, where in source_ids().items() if msgid not in known}
    assert missing == {}, "add these to locales/messages.pot and both .po files"


@pytest.mark.parametrize("locale", LOCALES)
def test_every_extracted_string_is_translated(locale: str) -> None:
    translated = {m.id for m in catalog(locale) if m.id and m.string}
    assert template_ids() - translated == set()


def test_stage_labels_render_in_both_languages() -> None:
    labels = "{% from '_labels.j2' import stage_label %}{{ stage_label('review') }}"
    assert text_environment("ru").from_string(labels).render() == "Ревью"
    assert text_environment("en").from_string(labels).render() == "Review"
