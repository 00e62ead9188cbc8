"""Chat apps' side requests: the short prompts a chat app sends around a user's turn
(conversation titles, tags, follow-up suggestions, search queries). They are not user
traffic: the router serves them without scoring (``side_requests`` in the settings) and
marks them ``side`` in the decision log, so they do not skew its decision statistics.

Recognised by the last user message, from the apps' own prompt templates:

- Open WebUI: every task prompt starts with ``### Task:`` (title, tags, follow-ups,
  query generation, autocomplete);
- a title *of the conversation itself*: LibreChat's "Please generate a concise,
  5-word-or-less title for the conversation" and "Provide a concise, 5-word-or-less title
  for the conversation", "a concise title (max 40 characters) for a conversation that
  starts with", "a 3-5 word title for the chat";
- LobeChat: the conversation, then "Please summarize the above conversation into a title"
  (or its Chinese default, "请总结上述对话为10个字以内的标题") at the end of the message.

A user's own request for a title of something else ("Please generate a short title for my
novel", "a title for the chat app I am building") is not a side request.
"""

from __future__ import annotations

import re

_WHICH = r"(?:the|this|a|our) (?:above |following |whole |entire |current )?"
# the conversation itself, not "the chat app" / "a chat widget" the user is building
_CONVERSATION = (r"(?:conversation|chat)\b"
                 r"(?! (?:app|application|bot|widget|window|interface|room|feature|service|tool)s?\b)")
_SIDE = re.compile(
    r"^\s*### Task:"
    rf"|\btitle\b[^\n.!?]{{0,40}}?\b(?:for|of) {_WHICH}{_CONVERSATION}"
    rf"|\bsummari[sz]e {_WHICH}{_CONVERSATION}[^\n.!?]{{0,60}}?\btitle\b"
    r"|总结上述对话[^\n]{0,20}标题",
    re.IGNORECASE)
_WINDOW = 2000  # characters read at each end of the message (LobeChat asks at the end)


def is_side_request(last_user: str) -> bool:
    """True for a chat app's own title/tag/follow-up prompt (see the module docstring)."""
    if _SIDE.search(last_user[:_WINDOW]):
        return True
    return len(last_user) > _WINDOW and bool(_SIDE.search(last_user[-_WINDOW:]))
