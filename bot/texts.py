"""The bot's words in the configured locale: gettext for short strings, Jinja2 for messages."""

from __future__ import annotations

import jinja2

from engine.templating import text_environment, translations


class Texts:
    def __init__(self, locale: str) -> None:
        self.locale = locale
        self.env: jinja2.Environment = text_environment(locale, html=True)
        self._catalog = translations(locale)

    def gettext(self, message: str, **values: object) -> str:
        text = self._catalog.gettext(message)
        return text % values if values else text

    def render(self, template: str, **context: object) -> str:
        return self.env.get_template(template).render(**context).strip()
