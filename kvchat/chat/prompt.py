"""The token ids the model sees for a conversation, at a cost that does not grow with its history.

A chat template renders a whole message list; rendering and tokenizing all of it every turn costs O(history)
(about 60 ms at 32k tokens, more when turns must be dropped). Most templates are *segment-stable*: what a
message adds to the text depends on the messages around it (the system prompt, its exchange), not on how
many came before. For those, each message's piece is rendered once in a small window, tokenized once and
remembered; a prompt is its pieces put together, and a turn renders only the new message.

A template that is not (one that moves the system prompt into the last user message, or renders a past reply
differently once a newer question follows) is rendered whole. Which kind a template is gets checked on
sample conversations when it is first seen, and again on every real conversation while it is short (a whole
render is cheap then): one difference and that template is rendered whole from then on.

Everywhere, a reply that carries the ids the model generated for it ('token_ids') and appears verbatim in the
rendered text keeps those ids, so the conversation re-renders to exactly the tokens in the cache
(re-tokenizing a reply can give other ids).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Sequence

from kvchat.chat.detokenize import decode
from kvchat.errors import KvchatError

Messages = list[dict[str, Any]]

VERIFY_MESSAGES = 8  # conversations this short are also rendered whole, and the two must agree
MAX_PIECES = 20_000  # remembered pieces (a few per message); the least recently used go first
MAX_CHAINS = 4  # conversations whose pieces are kept put together (the most recently rendered)

# Sample conversations a segment-stable template renders the same piece by piece as whole: with and without
# a system prompt, and with a reply whose think block some templates strip only from replies before the
# latest question.
_REPLY = "<think>\nLet me see.\n</think>\n\nYes, it is."
_SAMPLES: list[Messages] = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Is it?"},
     {"role": "assistant", "content": _REPLY}, {"role": "user", "content": "Why?"},
     {"role": "assistant", "content": "Because."}, {"role": "user", "content": "Thanks."}],
    [{"role": "user", "content": "Is it?"}, {"role": "assistant", "content": _REPLY},
     {"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Because."},
     {"role": "user", "content": "Thanks."}],
]


class _NotStable(Exception):
    """A window rendered text that is not an extension of its shorter window."""


class Renderer:
    """Renders message lists to token ids with one tokenizer's chat template (followed if it changes)."""

    def __init__(self, tokenizer: Any, pieces: bool = True):
        self.tokenizer = tokenizer
        self.use_pieces = pieces  # False: every render is whole (the way to compare, in the benchmark)
        self.whole_reason: str | None = None  # why this template is rendered whole, once it is known
        self._template: Any = None
        self._pieces: OrderedDict[tuple, list[int]] = OrderedDict()
        self._chains: list[_Chain] = []
        self._system_prefixes: dict[str | None, list[int]] = {}

    # -- public ---------------------------------------------------------------------------

    def render(self, messages: Messages, generation_prompt: bool = True) -> list[int]:
        """Token ids of the conversation as the chat template renders it, ready for the assistant's reply (or,
        without `generation_prompt`, ending where the reply's header would begin).

        Raises KvchatError when the template rejects the conversation.
        """
        self._follow_template()
        if not self.pieces_apply():
            return self.render_whole(messages, generation_prompt)
        try:
            ids = self._render_pieces(messages, generation_prompt)
        except (_NotStable, KvchatError) as exc:
            whole = self.render_whole(messages, generation_prompt)  # raises if the template rejects it all
            self.whole_reason = f"a window of the conversation did not render as part of it ({exc})"
            return whole
        if ids is not None and len(messages) <= VERIFY_MESSAGES:
            whole = self.render_whole(messages, generation_prompt)
            if whole != ids:
                self.whole_reason = "rendering piece by piece gave other tokens than rendering whole"
                return whole
        return ids if ids is not None else self.render_whole(messages, generation_prompt)

    def pieces_apply(self) -> bool:
        """Whether renders are put together from remembered pieces (the template is segment-stable)."""
        self._follow_template()
        return self.use_pieces and self.whole_reason is None

    def system_prefix_ids(self, system: str | None) -> list[int]:
        """The tokens every conversation with this system prompt starts with (whatever the first message is)."""
        self._follow_template()
        if system not in self._system_prefixes:
            head = [{"role": "system", "content": system}] if system else []
            a = self.render_whole(head + [{"role": "user", "content": "a"}])
            b = self.render_whole(head + [{"role": "user", "content": "b"}])
            self._system_prefixes[system] = a[:common_prefix(a, b)]
        return self._system_prefixes[system]

    def render_whole(self, messages: Messages, generation_prompt: bool = True) -> list[int]:
        """Render the whole list in one pass and tokenize it (replies found verbatim keep their ids)."""
        text = self._template_text(messages, generation_prompt)
        return self._tokenize_with_replies(text, messages)

    # -- the template ---------------------------------------------------------------------

    def _follow_template(self) -> None:
        """Forget what was learnt of the template when it changes; check a new one on the samples."""
        template = self.tokenizer.chat_template
        if template is self._template or template == self._template:
            return
        self._template = template
        self._pieces.clear()
        self._chains = []
        self._system_prefixes.clear()
        self.whole_reason = None
        if self.use_pieces:
            self.whole_reason = self._check_samples()
            self._chains = []

    def _check_samples(self) -> str | None:
        """Why the template is not segment-stable on the sample conversations (None when it is)."""
        for sample in _SAMPLES:
            for n in range(1, len(sample) + 1):
                part = sample[:n]
                for generation_prompt in (True, False):
                    try:
                        whole = self.render_whole(part, generation_prompt)
                    except KvchatError:
                        break  # a shape this template refuses (say, a system prompt): nothing to compare
                    try:
                        ids = self._render_pieces(part, generation_prompt)
                    except (_NotStable, KvchatError) as exc:
                        return f"a window of a sample conversation did not render as part of it ({exc})"
                    if ids is not None and ids != whole:
                        return "rendering piece by piece gave other tokens than rendering whole"
        return None

    def _template_text(self, messages: Messages, generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=generation_prompt)
        except Exception as exc:  # jinja raises its own errors for messages a template rejects
            raise KvchatError(f"the model's chat template rejected the conversation: {exc}") from None

    # -- tokens ---------------------------------------------------------------------------

    def _tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _tokenize_with_replies(self, text: str, messages: Messages) -> list[int]:
        """Tokenize `text`, a rendering of `messages`, keeping generated ids for replies found in it verbatim."""
        ids: list[int] = []
        done = search = 0  # text[:done] is tokenized; messages are looked for from `search` on, in order
        for message in messages:
            content = message.get("content")
            if not isinstance(content, str) or not content:
                continue
            at = text.find(content, search)
            if at < 0:
                continue  # the template changed this message's text
            search = at + len(content)
            generated = message.get("token_ids") if message.get("role") == "assistant" else None
            if isinstance(generated, list) and generated and decode(self.tokenizer, generated) == content:
                ids += self._tokenize(text[done:at]) + generated
                done = search
        return ids + self._tokenize(text[done:])

    # -- pieces ---------------------------------------------------------------------------

    def _render_pieces(self, messages: Messages, generation_prompt: bool) -> list[int] | None:
        """The conversation's ids put together from pieces, or None for a shape pieces do not cover (no user
        message first, content that is not text). Raises _NotStable or KvchatError from a window's render.

        Pieces: the system prompt with the first user message; then each message, as the text it adds to the
        window that starts at the user message before it; then the generation prompt. A message's piece
        does not depend on what came before its window, so a view that starts later in a conversation (turns
        dropped) shares every piece but its first with the conversation's chain.
        """
        head = messages[:1] if messages and messages[0].get("role") == "system" else []
        body = messages[len(head):]
        if not body or body[0].get("role") != "user" or \
                not all(isinstance(m.get("content"), str) for m in messages):
            return None
        chain, start = self._chain_for(head, body)
        matched = chain.match(body, start)
        chain.cut(start + matched)  # a message changed inside the chain: what followed it is rendered again
        window = chain.last_user[-1] - start if matched else 0  # the user message the next window starts at
        for k in range(matched, len(body)):
            chain.append(body[k], self._piece(head, body[:1], first=True) if start + k == 0 else
                         self._piece(head, body[window:k + 1]))
            if body[k].get("role") == "user":
                window = k
        if start == 0:
            ids = chain.ids[:chain.ends[len(body) - 1]]
        else:
            later = chain.ids[chain.ends[start]:chain.ends[start + len(body) - 1]]
            ids = self._piece(head, body[:1], first=True) + later
        if generation_prompt:
            ids += self._piece(head, body[window:], generation=True)
        return ids

    def _chain_for(self, head: Messages, body: Messages) -> tuple["_Chain", int]:
        """The chain that holds `body[0]` with this head, and where; or a new chain that starts with it."""
        key = _key(head)
        for chain in self._chains:
            start = chain.find(body[0]) if chain.head == key else None
            if start is not None:
                self._chains.remove(chain)
                self._chains.insert(0, chain)
                return chain, start
        chain = _Chain(key)
        self._chains = [chain] + self._chains[:MAX_CHAINS - 1]
        return chain, 0

    def _piece(self, head: Messages, window: Messages, first: bool = False, generation: bool = False) -> list[int]:
        """The ids that the last message of `window` (or, with `generation`, the generation prompt) adds; with
        `first`, the ids of the whole window. Remembered by the messages it depends on."""
        key = (_key(head), _key(window), first, generation)
        found = self._pieces.get(key)
        if found is not None:
            self._pieces.move_to_end(key)
            return found
        if first:
            ids = self._tokenize_with_replies(self._template_text(head + window, False), head + window)
        else:
            shorter = head + (window if generation else window[:-1])
            before = self._template_text(shorter, False)
            after = self._template_text(head + window, generation)
            if not after.startswith(before):
                raise _NotStable("a message changed the text before it")
            added = after[len(before):]
            ids = self._tokenize(added) if generation else self._tokenize_with_replies(added, window[-1:])
        self._pieces[key] = ids
        if len(self._pieces) > MAX_PIECES:
            self._pieces.popitem(last=False)
        return ids


class _Chain:
    """One conversation's pieces from its first user message on, put together: `ids` are the tokens of its body
    (without generation prompt), `ends[k]` how many of them message k's piece ends at. Messages are kept as
    copies of what was rendered, and compared by value."""

    def __init__(self, head: tuple):
        self.head = head
        self.messages: list[tuple] = []  # (role, content, token_ids) of each message
        self.where: dict[int, int] = {}  # id() of the message object -> its position (a hint, checked by value)
        self.ends: list[int] = []
        self.last_user: list[int] = []  # position of the latest user message at or before each position
        self.ids: list[int] = []

    def find(self, message: dict[str, Any]) -> int | None:
        at = self.where.get(id(message))
        return at if at is not None and at < len(self.messages) and _same(self.messages[at], message) else None

    def match(self, body: Messages, start: int) -> int:
        """How many messages of `body` equal the chain's from `start` on."""
        n = 0
        for message, kept in zip(body, self.messages[start:]):
            if not _same(kept, message):
                break
            n += 1
        return n

    def cut(self, n: int) -> None:
        if n < len(self.messages):
            del self.messages[n:], self.ends[n:], self.last_user[n:]
            del self.ids[self.ends[-1] if self.ends else 0:]
            self.where = {k: v for k, v in self.where.items() if v < n}

    def append(self, message: dict[str, Any], piece: list[int]) -> None:
        position = len(self.messages)
        self.where[id(message)] = position
        self.last_user.append(position if message.get("role") == "user" or not position else self.last_user[-1])
        self.messages.append(_value(message))
        self.ids += piece
        self.ends.append(len(self.ids))


# What a piece depends on in a message: its role, its text, and a reply's generated ids. `_key` makes it
# hashable (the pieces' dictionary); a chain keeps it as `_value` (a copy) and compares with `_same` (no copy).

def _ids(message: dict[str, Any]) -> list[int] | None:
    ids = message.get("token_ids")
    return ids if isinstance(ids, list) else None


def _value(message: dict[str, Any]) -> tuple:
    ids = _ids(message)
    return message.get("role"), message.get("content"), None if ids is None else list(ids)


def _same(kept: tuple, message: dict[str, Any]) -> bool:
    role, content, ids = kept
    return role == message.get("role") and content == message.get("content") and ids == _ids(message)


def _key(messages: Messages) -> tuple:
    return tuple((m.get("role"), m.get("content"), None if _ids(m) is None else tuple(_ids(m))) for m in messages)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token id sequences (lists or tuples, mixed)."""
    a, b = list(a), list(b)  # (a tuple slice never equals a list slice: blocks are compared like with like)
    n = min(len(a), len(b))
    step = 512
    start = 0
    while start < n and a[start:start + step] == b[start:start + step]:  # compared in C, a block at a time
        start += step
    for i in range(start, n):
        if a[i] != b[i]:
            return i
    return n
