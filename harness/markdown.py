"""Markdown for summary.md: tables and a document that says what produced it."""
from __future__ import annotations

from collections.abc import Callable

MISSING = "—"


def _cell(value, fmt: str | Callable | None) -> str:
    if value is None:
        return MISSING
    try:
        text = fmt(value) if callable(fmt) else (fmt or "{}").format(value)
    except (ValueError, TypeError):  # e.g. "{:.2f}" given a string: show it as it is
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def table(rows: list[dict], columns: list[tuple]) -> str:
    """columns: (key, header, fmt) with fmt a format string like "{:.2f}", a callable or None.
    A missing key or a None value shows as an em dash."""
    lines = ["| " + " | ".join(header for _, header, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(key), fmt) for key, _, fmt in columns)
                     + " |")
    return "\n".join(lines) + "\n"


def _device(env: dict) -> str:
    gpus = env.get("gpus") or []
    if not gpus:
        return f"CPU: {env.get('cpu_model', 'unknown')} ({env.get('cpu_count', '?')} cores)"
    names = [g.get("name", "?") for g in gpus]
    counted = ", ".join(f"{names.count(n)} x {n}" for n in dict.fromkeys(names))
    return f"{counted} (driver {gpus[0].get('driver_version', '?')})"


def provenance(env: dict) -> str:
    git = env.get("git")
    if git:
        git_line = f"`{git['sha']}`" + (" with uncommitted changes" if git.get("dirty") else "")
    else:
        git_line = "not a git checkout"
    lines = [
        f"- Command: `{' '.join(str(env.get('command', 'unknown')).split())}`",
        f"- Git: {git_line}",
        f"- Device: {_device(env)}",
        f"- Host: {env.get('hostname', 'unknown')}",
        f"- Date (UTC): {env.get('timestamp', 'unknown')}",
        f"- Software: TVM {env.get('tvm_version', 'unknown')}, "
        f"tvm-tp-lab {env.get('project_version', 'unknown')}, "
        f"Python {env.get('python_version', 'unknown')}",
    ]
    return "\n".join(lines) + "\n"


def summary_document(title: str, env: dict, sections: list[tuple[str, str]]) -> str:
    parts = [f"# {title}\n", provenance(env)]
    for heading, body in sections:
        parts.append(f"## {heading}\n\n{body.rstrip()}\n")
    return "\n".join(parts)
