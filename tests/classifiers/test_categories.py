"""Token categories on hand-made passages: repeats, distances, brackets, word classes."""

from __future__ import annotations

import re

import numpy as np
import pytest

from classifiers.categories import (
    char_categories,
    language_for,
    local_reuse,
    previous_distance,
    repeat_lengths,
    token_categories,
)


def brute_repeat(ids: list[int]) -> list[int]:
    """O(n^3) reference: longest n with ids[i-n+1..i] occurring in ids[:i]."""
    out = []
    for i in range(len(ids)):
        best = 0
        for n in range(1, i + 1):
            pat = ids[i - n + 1:i + 1]
            if any(ids[j:j + n] == pat for j in range(0, i - n + 1)):
                best = n
            else:
                break
        out.append(best)
    return out


def roles(text: str, lang: str) -> str:
    """'o' opening, 'c' closing, '.' other, per character."""
    cc = char_categories(text, lang)
    return "".join("o" if b > 0 else "c" if b < 0 else "." for b in cc.bracket)


def marked(text: str, lang: str) -> list[tuple[int, str]]:
    cc = char_categories(text, lang)
    return [(i, "open" if b > 0 else "close") for i, b in enumerate(cc.bracket) if b]


# --- repeated n-grams ------------------------------------------------------------------
def test_repeat_lengths_hand_made():
    #        the cat sat . the cat sat on the mat .
    ids = [1, 2, 3, 4, 1, 2, 3, 5, 1, 6, 4]
    assert repeat_lengths(ids).tolist() == [0, 0, 0, 0, 1, 2, 3, 0, 1, 0, 1]


def test_repeat_lengths_periodic_and_empty():
    assert repeat_lengths([7, 7, 7, 7]).tolist() == [0, 1, 2, 3]
    assert repeat_lengths([]).tolist() == []


@pytest.mark.parametrize("seed", range(5))
def test_repeat_lengths_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 3 + seed, size=120).tolist()
    assert repeat_lengths(ids).tolist() == brute_repeat(ids)


def test_repeat_lengths_is_linear_enough():
    ids = np.random.default_rng(0).integers(0, 50, size=50_000).tolist()
    ids = ids + ids  # a 50k-token verbatim repeat
    r = repeat_lengths(ids)
    assert r[-1] == 50_000


def test_previous_distance_and_local_reuse():
    ids = [5, 6, 5, 5, 7, 6]
    assert previous_distance(ids).tolist() == [-1, -1, 2, 1, -1, 4]
    assert local_reuse(ids, span=3).tolist() == [0, 0, 1, 2, 0, 0]


# --- brackets --------------------------------------------------------------------------
def test_python_brackets_skip_strings_and_comments():
    src = 'x = f(a["(k"], {1: 2})  # ) ] }\ns = """ ( [ """\n'
    got = marked(src, "python")
    expect = [src.index("("), src.index("["), src.index("]"), src.index("{"), src.index("}"),
              src.index(")")]
    assert [i for i, _ in got] == sorted(expect)
    assert dict(got)[src.index(")")] == "close"
    assert dict(got)[src.index("(")] == "open"


def test_python_fstring_interpolation_is_code():
    src = 'y = f"({x[0]})"\n'
    got = dict(marked(src, "python"))
    assert got[src.index("{")] == "open" and got[src.index("}")] == "close"
    assert got[src.index("[")] == "open" and got[src.index("]")] == "close"
    assert src.index("(") not in got and src.index(")") not in got  # literal text


def test_javascript_template_and_comment():
    src = "const s = `(${a[1]}`; // (\nf(s);\n"
    got = dict(marked(src, "javascript"))
    assert src.index("(") not in got and src.rindex("(") in got
    assert got[src.index("[")] == "open"


def test_html_tags_and_text():
    src = '<p class="a(b)">Hi (x) <!-- (c --> </p><br/>'
    got = dict(marked(src, "html"))
    assert got[0] == "open"  # start tag
    assert got[src.index("</")] == "close" and got[src.index("</") + 1] == "close"
    assert got[src.index("Hi (") + 3] == "open" and got[src.index("x)") + 1] == "close"
    assert src.index("a(b)") + 1 not in got  # attribute value
    assert src.index("(c") not in got  # comment
    assert got[src.index("/>")] == "close"


def test_markdown_fence_parsed_in_its_language():
    src = "See [link](u).\n\n```python\nprint(')')\n```\n"
    got = dict(marked(src, "markdown"))
    assert got[src.index("[")] == "open" and got[src.index("](") + 1] == "open"
    p = src.index("print(")
    assert got[p + 5] == "open" and got[src.index("')')") + 3] == "close"
    assert src.index("')')") + 1 not in got  # inside the string


def test_tex_comments_and_escapes():
    src = "\\section{A} \\{ % (x}\n\\[ a \\]"
    got = dict(marked(src, "tex"))
    assert got[src.index("{")] == "open" and got[src.index("}")] == "close"
    assert src.index("\\{") + 1 not in got
    assert src.index("(x") not in got
    assert got[src.index("\\[") + 1] == "open" and got[src.index("\\]") + 1] == "close"


def test_prose_char_scan():
    assert roles("a (b [c] {d}) <e>", "prose") == "..o..o.c.o.cc...."


def test_language_for():
    assert language_for("code") == "python" and language_for(".md") == "markdown"
    assert language_for("dict") == "prose"


# --- tokens ----------------------------------------------------------------------------
def spans(text: str, pattern: str = r"\s*\w+|\s*[^\w\s]|\s+") -> list[tuple[int, int]]:
    return [m.span() for m in re.finditer(pattern, text)]


def test_word_classes_in_prose():
    text = "The cats sat on 42 mats (quietly)."
    tc = token_categories(text, spans(text), "prose")
    assert tc.word_class.tolist() == ["function", "content", "content", "function", "number",
                                      "content", "punct", "content", "punct", "punct"]
    assert tc.bracket.tolist()[6] == "open" and tc.bracket.tolist()[8] == "close"
    assert tc.bracket_kind.tolist()[6] == "()"


def test_word_classes_in_code_and_subwords():
    text = "def foo_bar(x):\n    return x  # the sum\n"
    pieces = ["def", " foo", "_bar", "(", "x", "):", "\n   ", " return", " x", "  #", " the",
              " sum", "\n"]
    assert "".join(pieces) == text
    ends = np.cumsum([len(p) for p in pieces])
    toks = list(zip(ends - [len(p) for p in pieces], ends, strict=True))
    tc = token_categories(text, toks, "python")
    wc = tc.word_class.tolist()
    assert wc[:3] == ["keyword", "identifier", "identifier"]
    assert tc.word_start.tolist()[1] and not tc.word_start.tolist()[2]
    assert wc[6] == "whitespace" and wc[7] == "keyword" and wc[8] == "identifier"
    assert wc[9] == "punct"
    assert wc[10] == "function" and wc[11] == "content"  # comment words are prose
    assert tc.bracket.tolist()[3] == "open" and tc.bracket.tolist()[5] == "close"


def test_whitespace_and_special_tokens():
    text = "a  \n b"
    tc = token_categories(text, [(0, 1), (1, 4), (4, 6), (6, 6)], "prose")
    assert tc.word_class.tolist() == ["function", "whitespace", "content", "special"]


def test_html_words_are_markup_inside_tags():
    text = "<div class=x>the box</div>"
    toks = spans(text, r"</|\w+|[^\w\s]|\s+")
    tc = token_categories(text, toks, "html")
    by_text = {text[s:e]: c for (s, e), c in zip(toks, tc.word_class, strict=True)}
    assert by_text["div"] == "markup" and by_text["class"] == "markup"
    assert by_text["the"] == "function" and by_text["box"] == "content"
    br = {text[s:e]: b for (s, e), b in zip(toks, tc.bracket, strict=True)}
    assert br["</"] == "close"


def test_backslash_words_are_markup_only_in_tex():
    py = 's = "a\\nb"\n'
    tc = token_categories(py, spans(py, r"\\|\w+|[^\w\s]|\s+"), "python")
    assert "markup" not in tc.word_class.tolist()
    tex = "\\section{Intro} the"
    toks = [(0, 8), (8, 9), (9, 14), (14, 15), (15, 19)]
    tc = token_categories(tex, toks, "tex")
    assert tc.word_class.tolist() == ["markup", "punct", "content", "punct", "function"]
