"""Submitting server-rendered HTML forms the way a browser would (for flow tests)."""

from __future__ import annotations

from dataclasses import dataclass, field
from html.parser import HTMLParser
from urllib.parse import urljoin

import aiohttp


@dataclass
class Form:
    action: str
    method: str
    fields: dict[str, str] = field(default_factory=dict)
    buttons: dict[str, str] = field(default_factory=dict)


class _FormParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.forms: list[Form] = []

    select: str | None = None  # the name of the <select> being read
    textarea: str | None = None  # the name of the <textarea> being read

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.forms.append(Form(a.get("action", ""), a.get("method", "get").lower()))
        elif self.forms and tag == "select" and a.get("name"):
            self.select = a["name"]
        elif self.forms and tag == "option" and self.select:
            # a browser sends the selected option, else the first one
            if "selected" in a or self.select not in self.forms[-1].fields:
                self.forms[-1].fields[self.select] = a.get("value", "")
        elif self.forms and tag == "textarea" and a.get("name"):
            self.textarea = a["name"]
            self.forms[-1].fields[self.textarea] = ""
        elif self.forms and tag in ("input", "button") and a.get("name"):
            kind = a.get("type", "submit" if tag == "button" else "text")
            if kind == "submit":
                self.forms[-1].buttons[a["name"]] = a.get("value", "")
            elif kind not in ("checkbox", "radio") or "checked" in a:
                self.forms[-1].fields[a["name"]] = a.get("value", "")


    def handle_endtag(self, tag: str) -> None:
        if tag == "select":
            self.select = None
        elif tag == "textarea":
            self.textarea = None

    def handle_data(self, data: str) -> None:
        if self.textarea and self.forms:
            self.forms[-1].fields[self.textarea] += data


def forms(html: str) -> list[Form]:
    parser = _FormParser()
    parser.feed(html)
    return parser.forms


def find_form(html: str, *, field_name: str | None = None, button: str | None = None) -> Form:
    for form in forms(html):
        if (field_name is None or field_name in form.fields) and (
                button is None or button in form.buttons):
            return form
    raise AssertionError(f"no form with field {field_name!r} / button {button!r} in:\n{html}")


async def submit(session: aiohttp.ClientSession, page_url: str, html: str, *,
                 values: dict[str, str] | None = None, button: str | None = None,
                 field_name: str | None = None) -> aiohttp.ClientResponse:
    """Fill and submit the first matching form; follows redirects like a browser."""
    form = find_form(html, field_name=field_name or next(iter(values or {}), None),
                     button=button)
    data = {**form.fields, **(values or {})}
    if button:
        data[button] = form.buttons[button]
    url = urljoin(page_url, form.action or page_url)
    if form.method == "post":
        return await session.post(url, data=data)
    return await session.get(url, params=data)
