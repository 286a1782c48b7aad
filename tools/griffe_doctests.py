"""A griffe extension for the docs site: the ``>>>`` examples in weightgeo's docstrings become fenced ``pycon``
code blocks before mkdocstrings renders them (as Markdown, ``>>> x["a"]`` would be a quote holding a link)."""

from __future__ import annotations

from typing import Any

import griffe


def fence_doctests(text: str) -> str:
    """Wrap each run of ``>>>`` / ``...`` lines and their expected output in a fenced block.

    >>> print(fence_doctests("Sum.\\n\\n>>> 1 + 1\\n2\\n\\nMore."))
    Sum.
    <BLANKLINE>
    ```pycon
    >>> 1 + 1
    2
    ```
    <BLANKLINE>
    More.
    """
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        stripped = lines[i].lstrip()
        if stripped.startswith(">>>"):
            indent = lines[i][: len(lines[i]) - len(stripped)]
            out.append(f"{indent}```pycon")
            while i < len(lines) and lines[i].strip() and lines[i].startswith(indent):
                out.append(lines[i])
                i += 1
            out.append(f"{indent}```")
            continue
        out.append(lines[i])
        i += 1
    return "\n".join(out)


class FenceDoctests(griffe.Extension):
    """Fence the doctest examples of every docstring griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None and ">>>" in obj.docstring.value:
            obj.docstring.value = fence_doctests(obj.docstring.value)
