"""Tree-sitter grammars (installed as wheels): the one map from a language name to its
grammar, shared by the token categories (analysis) and the request features (routing)."""

from __future__ import annotations

import importlib
from functools import cache

MODULES: dict[str, str] = {
    "python": "tree_sitter_python",
    "javascript": "tree_sitter_javascript",
    "html": "tree_sitter_html",
    "json": "tree_sitter_json",
    "c": "tree_sitter_c",
    "markdown": "tree_sitter_markdown",
}


@cache
def language(name: str):
    """The ``tree_sitter.Language`` for ``name``, or None when there is no grammar for it
    (unknown name, or its wheel is not installed). Languages are immutable and can be
    shared; parsers cannot (make one per thread)."""
    module = MODULES.get(name)
    if module is None:
        return None
    try:
        import tree_sitter as ts

        mod = importlib.import_module(module)
    except ImportError:
        return None
    return ts.Language(mod.language())
