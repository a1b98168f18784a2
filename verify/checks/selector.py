"""Metric paths into summary.json, e.g. `checks[name=model/edit/outputs,dtype=fp32].max_abs_err`, `lora.scale.value`.

Grammar: segments joined by `.`; each segment is a key, optionally followed by `[field=value,...]` (pick the one
record of a list whose fields equal those values) and/or `[N]` (the N-th element of a list). Values may hold `/`,
`-` and `.`, not `,` or `]`. A filter must select exactly one record: none or several is an error, never a guess.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from verify.errors import VerifyError

_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class SelectError(VerifyError):
    """A path that is malformed, names a key that does not exist, or whose filter selects none or several records."""


class Absent(Exception):  # noqa: N818  (a condition, not an error: the run did not measure this)
    """The path runs through a null section (e.g. `lora` when no LoRA was given): not measured in this run."""


@dataclass(frozen=True)
class Step:
    key: str
    filters: tuple[tuple[str, str], ...] | None = None
    index: int | None = None


def parse(path: str) -> list[Step]:
    """`a[k=v].b[2]` -> [Step('a', (('k', 'v'),)), Step('b', index=2)]; SelectError on bad syntax."""
    if not isinstance(path, str) or not path.strip():
        raise SelectError(f"metric path {path!r}: empty")
    steps, pos = [], 0
    while True:
        m = _KEY.match(path, pos)
        if not m:
            raise SelectError(f"metric path {path!r}: expected a key at position {pos}")
        key, pos = m.group(0), m.end()
        filters, index = None, None
        while pos < len(path) and path[pos] == "[":
            end = path.find("]", pos)
            if end < 0:
                raise SelectError(f"metric path {path!r}: '[' at position {pos} is never closed")
            body = path[pos + 1:end].strip()
            if re.fullmatch(r"-?\d+", body):
                index = int(body)
            elif filters is None and index is None:
                filters = _filters(path, body)
            else:
                raise SelectError(f"metric path {path!r}: put the [field=value] filter before the [N] index")
            pos = end + 1
        steps.append(Step(key, filters, index))
        if pos == len(path):
            return steps
        if path[pos] != ".":
            raise SelectError(f"metric path {path!r}: expected '.' or '[' at position {pos}")
        pos += 1


def _filters(path: str, body: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for part in body.split(","):
        name, eq, value = part.partition("=")
        if not eq or not _KEY.fullmatch(name.strip()) or not value.strip():
            raise SelectError(f"metric path {path!r}: filter {part!r} is not field=value")
        pairs.append((name.strip(), value.strip()))
    return tuple(pairs)


def resolve(data, path: str):
    """The value at `path`; SelectError when it selects nothing (or several), Absent through a null section."""
    value, walked = data, ""
    for step in parse(path):
        if value is None:
            raise Absent(f"{walked} is null in this run")
        if not isinstance(value, dict) or step.key not in value:
            have = ", ".join(sorted(value)) if isinstance(value, dict) else type(value).__name__
            raise SelectError(f"metric path {path!r}: no key {step.key!r} at {walked or 'the top'} (has: {have})")
        value, walked = value[step.key], _join(walked, step.key)
        if step.filters is not None:
            value = _pick(value, step.filters, path, walked)
            walked += "[" + ",".join(f"{k}={v}" for k, v in step.filters) + "]"
        if step.index is not None:
            if value is None:
                raise Absent(f"{walked} is null in this run")
            if not isinstance(value, list) or not -len(value) <= step.index < len(value):
                size = len(value) if isinstance(value, list) else type(value).__name__
                raise SelectError(f"metric path {path!r}: index {step.index} out of range at {walked} ({size})")
            value, walked = value[step.index], f"{walked}[{step.index}]"
    return value


def _join(walked: str, key: str) -> str:
    return f"{walked}.{key}" if walked else key


def _pick(records, filters: tuple[tuple[str, str], ...], path: str, walked: str) -> dict:
    if records is None:
        raise Absent(f"{walked} is null in this run")
    if not isinstance(records, list):
        raise SelectError(f"metric path {path!r}: {walked} is not a list of records; it cannot take a filter")
    found = [r for r in records if isinstance(r, dict) and all(matches(r.get(k, _MISSING), v) for k, v in filters)]
    wanted = ", ".join(f"{k}={v}" for k, v in filters)
    if not found:
        seen = {k: sorted({str(r.get(k)) for r in records if isinstance(r, dict)}) for k, _ in filters}
        present = "; ".join(f"{k}: {', '.join(v[:8])}{', ...' if len(v) > 8 else ''}" for k, v in seen.items())
        raise SelectError(f"metric path {path!r}: no record of {walked} has {wanted} (present: {present})")
    if len(found) > 1:
        raise SelectError(f"metric path {path!r}: {len(found)} records of {walked} have {wanted}; add a filter "
                          "(e.g. dtype=, fixture=, implementation=) so that exactly one is selected")
    return found[0]


_MISSING = object()


def matches(actual, text: str) -> bool:
    """A record field equals a filter's text: numbers numerically, booleans as true/false, null as null."""
    if actual is _MISSING:
        return False
    if isinstance(actual, bool):
        return text.lower() == str(actual).lower()
    if actual is None:
        return text.lower() in ("null", "none")
    if isinstance(actual, (int, float)):
        try:
            return float(text) == float(actual)
        except ValueError:
            return False
    return str(actual) == text


def path_of(section: str, filters: dict, field: str | None = None) -> str:
    """The path that selects `field` of the record with `filters` in `section` (the inverse of resolve)."""
    text = section + "[" + ",".join(f"{k}={v}" for k, v in filters.items()) + "]"
    return f"{text}.{field}" if field else text
