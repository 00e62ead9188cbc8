"""Word lists shared by the token-level analysis (:mod:`classifiers.categories`), the
request features (:mod:`classifiers.features`) and the rules policy
(:mod:`router.policies`): one copy of each, in a module that imports nothing, so the
router's hot path does not load the analysis to read a list."""

from __future__ import annotations

# Closed-class English words: determiners, pronouns, prepositions, conjunctions,
# auxiliaries and modals, particles, wh-words, existential "there", and common
# contractions' parts. Open classes (nouns, verbs, adjectives, adverbs) are "content".
FUNCTION_WORDS: frozenset[str] = frozenset("""
a an the this that these those each every either neither some any no all both few many
much more most several such what which whose whatever whichever another other own
i me my mine myself you your yours yourself yourselves he him his himself she her hers
herself it its itself we us our ours ourselves they them their theirs themselves one
ones who whom whoever whomever someone somebody something anyone anybody anything
everyone everybody everything nobody nothing none
about above across after against along amid among around as at before behind below
beneath beside besides between beyond but by despite down during except for from in
inside into like near of off on onto out outside over past per since than through
throughout till to toward towards under underneath unlike until unto up upon via with
within without
and or nor so yet because although though while whereas if unless whether once lest
be am is are was were been being have has had having do does did doing done
will would shall should can could may might must ought
not n't 's 're 've 'd 'll 'm t s re ve d ll m
there here then when where why how whenever wherever whereby wherein thereof therein
thereby hence thus also too very just only even else
don't doesn't didn't can't cannot won't isn't aren't wasn't weren't hasn't haven't hadn't
shouldn't wouldn't couldn't it's that's there's let's i'm you're we're they're i've you've
""".split())

# Words that ask for a copy of a given text (the ``copy_cue`` feature and the rules
# policy's copy rule). Matched as whole words, case-insensitively, with inflections
# ("quoted", "repeats"); multi-word cues as phrases ("word for word" also as
# "word-for-word").
COPY_CUES: tuple[str, ...] = (
    "quote", "repeat", "verbatim", "extract", "copy", "copies", "copied", "exact", "exactly",
    "word for word", "reproduce", "transcribe", "same text", "same words", "as written",
    "unchanged", "duplicate", "restate", "echo")
