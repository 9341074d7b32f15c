"""Print the settings as a Markdown table (the README's table is this output)."""

from pydantic_core import to_json

from configs.settings import Settings


def markdown_table() -> str:
    """One table, a heading row per group of settings."""
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for group in Settings.GROUPS:
        lines.append(f"| **{group.__doc__.strip().rstrip('.')}** | | |")
        for name, field in group.model_fields.items():
            default = "unset" if field.default is None else f"`{to_json(field.default, exclude_none=True).decode() if isinstance(field.default, dict) else field.default}`"
            lines.append(f"| `ASR_{name.upper()}` | {default} | {field.description} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
