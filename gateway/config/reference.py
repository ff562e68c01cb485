"""The configuration reference, made from ``Settings`` as the CLI reads it.

``docs/configuration.md`` holds it between two markers; ``python -m gateway.config.reference``
writes it there, and a test fails when what is there is not what ``Settings`` says.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic.fields import FieldInfo

from gateway.config.flags import FLAG_NAMES, NOT_FLAGS, REPEATABLE, env_name
from gateway.config.settings import Settings

BEGIN = "<!-- configuration reference: made by python -m gateway.config.reference; do not edit -->"
END = "<!-- end of the configuration reference -->"
PAGE = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def table() -> str:
    """Every setting as a row: flag, environment variable, default, meaning."""
    rows = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        if name in NOT_FLAGS:
            continue
        flag = f"`{FLAG_NAMES.get(name, '--' + name.replace('_', '-'))}`"
        env, _, how = env_name(name, field.validation_alias).partition(", ")
        if name in REPEATABLE:
            flag += " (repeatable)"
            env = f"`{env}` ({how})"
        else:
            env = f"`{env}`"
        meaning = (field.description or "").replace("|", "\\|")
        rows.append(f"| {flag} | {env} | {_default(field)} | {meaning} |")
    return "\n".join(rows)


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        return "none"
    value = field.default
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if hasattr(value, "value"):  # an enum
        value = value.value
    return f"`{value}`"


def page(text: str) -> str:
    """``text`` (the page) with the reference between its markers made anew."""
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[:start] + "\n\n" + table() + "\n\n" + text[end:]


def main() -> int:
    PAGE.write_text(page(PAGE.read_text(encoding="utf-8")), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
