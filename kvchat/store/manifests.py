"""The store's JSON records as dataclasses, parsed and validated in one place: a session's manifest, a shared
prefix's entry, a recurrent-state entry. Never imports torch.

Parsing raises ValueError saying what is wrong; a record that parses has every field of the type kvchat reads,
so no other module reads these files' raw dictionaries (prune alone reads them loosely, see `kv_references`).
The JSON written is the same as before these classes existed: old stores load unchanged.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass, field
from typing import Any

CHUNK_TOKENS = 128
KEY_PATTERN = re.compile(r"[0-9a-f]{40}")


def is_key(value: Any) -> bool:
    """Whether `value` is a chunk or state key kvchat computes (40 hex digits): the only kind that names a file."""
    return isinstance(value, str) and KEY_PATTERN.fullmatch(value) is not None


def transcript_crc(messages: list[dict[str, Any]]) -> str:
    """A checksum of a transcript as saved (its canonical JSON)."""
    return str(zlib.crc32(json.dumps(messages, sort_keys=True, ensure_ascii=True).encode()))


def _ids(value: Any) -> bool:
    return isinstance(value, list) and all(type(v) is int and v >= 0 for v in value)


def _number(value: Any) -> float | None:
    return float(value) if type(value) in (int, float) else None


def parse_messages(value: Any) -> list[dict[str, Any]]:
    """`value` if it is a transcript (a list of messages with a role, a text and maybe token ids); else
    ValueError."""
    if not isinstance(value, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            and ("token_ids" not in m or _ids(m["token_ids"])) for m in value):
        raise ValueError("its transcript is not a list of messages")
    return value


@dataclass(frozen=True)
class StateEntry:
    """A stored recurrent-state snapshot: after the first `tokens` token ids, in the file its `key` names."""

    tokens: int
    key: str
    pinned: bool = False

    @classmethod
    def parse(cls, raw: Any) -> "StateEntry | None":
        """The entry, or None when it is not one (a damaged entry is never used)."""
        if not isinstance(raw, dict) or type(raw.get("tokens")) is not int or raw["tokens"] <= 0 \
                or not is_key(raw.get("key")):
            return None
        return cls(raw["tokens"], raw["key"], raw.get("pinned") is True)

    def to_json(self, with_pin: bool = True) -> dict[str, Any]:
        return {"tokens": self.tokens, "key": self.key, **({"pinned": self.pinned} if with_pin else {})}


@dataclass
class SessionManifest:
    """A saved session: its transcript (the source of truth) and the KV files that hold its token ids' cache.

    `format`, `fingerprint` and `chunk_tokens` say which model and store format made the KV; the KV is used only
    when they are this store's. `recovered` (never saved) says why a damaged manifest was replaced by the save
    before it.
    """

    name: str
    messages: list[dict[str, Any]] = field(default_factory=list)
    first_kept: int = 0
    token_ids: list[int] = field(default_factory=list)
    chunks: list[str] = field(default_factory=list)
    tail_key: str | None = None
    states: list[StateEntry] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)  # sampling settings as saved (checked where used)
    model: str | None = None
    fingerprint: str | None = None
    format: int | None = None
    chunk_tokens: int | None = CHUNK_TOKENS
    created: float | None = None
    updated: float | None = None
    turns: int = 0
    recovered: str | None = None

    @classmethod
    def parse(cls, raw: Any, name: str) -> "SessionManifest":
        """The manifest of session `name` in `raw` (a file's parsed JSON); ValueError saying what is wrong."""
        if not isinstance(raw, dict):
            raise ValueError("the manifest is not a JSON object")
        if raw.get("name", name) != name:
            raise ValueError(f"it is the manifest of another session ({str(raw.get('name'))[:40]!r})")
        messages = parse_messages(raw.get("messages"))
        if "transcript_crc" in raw and raw["transcript_crc"] != transcript_crc(messages):
            raise ValueError("its transcript fails its checksum")
        token_ids = raw.get("token_ids", [])
        if not _ids(token_ids):
            raise ValueError("its token ids are not a list of token ids")
        chunks = raw.get("chunks", [])
        if not (isinstance(chunks, list) and all(isinstance(k, str) for k in chunks)):
            raise ValueError("its chunk list is damaged")
        tail, states = raw.get("tail"), raw.get("states") or []
        if not isinstance(tail, (dict, type(None))) or not isinstance(states, list):
            raise ValueError("its KV listing is damaged")
        first_kept = raw.get("first_kept", 0)
        if type(first_kept) is not int or not 0 <= first_kept <= len(messages):
            raise ValueError("its first kept message is out of range")
        turns = raw.get("turns", sum(1 for m in messages if m["role"] == "user"))
        if type(turns) is not int:
            raise ValueError("its turn count is damaged")
        tail_key = tail.get("key") if isinstance(tail, dict) else None
        return cls(
            name=name, messages=messages, first_kept=first_kept, token_ids=token_ids, chunks=chunks,
            tail_key=tail_key if isinstance(tail_key, str) else None,
            states=[entry for entry in map(StateEntry.parse, states) if entry is not None],
            settings=raw["settings"] if isinstance(raw.get("settings"), dict) else {},
            model=raw["model"] if isinstance(raw.get("model"), str) else None,
            fingerprint=raw["fingerprint"] if isinstance(raw.get("fingerprint"), str) else None,
            format=raw["format"] if type(raw.get("format")) is int else None,
            chunk_tokens=raw.get("chunk_tokens", CHUNK_TOKENS) if type(raw.get("chunk_tokens", 0)) is int else None,
            created=_number(raw.get("created")), updated=_number(raw.get("updated")), turns=turns)

    def to_json(self) -> dict[str, Any]:
        """The manifest as written to NAME.json."""
        tail = {"key": self.tail_key, "file": f"{self.name}-{self.tail_key[:16]}.safetensors"} \
            if self.tail_key else None
        return {
            "format": self.format, "name": self.name, "model": self.model, "fingerprint": self.fingerprint,
            "created": self.created, "updated": self.updated, "turns": self.turns,
            "messages": self.messages, "first_kept": self.first_kept, "token_ids": self.token_ids,
            "chunk_tokens": self.chunk_tokens, "chunks": self.chunks, "tail": tail,
            "states": [entry.to_json() for entry in self.states], "settings": self.settings,
            "transcript_crc": transcript_crc(self.messages),
        }


@dataclass
class PrefixEntry:
    """A shared prefix (a system prompt): its token ids, the chunks holding their KV, the recurrent state after
    them (models with state layers), and when it was last used (for least-recently-used eviction)."""

    key: str
    token_ids: list[int]
    chunks: list[str]
    fingerprint: str | None = None
    chunk_tokens: int | None = CHUNK_TOKENS
    state: StateEntry | None = None
    last_used: float = 0.0
    format: int | None = None

    @classmethod
    def parse(cls, raw: Any, key: str) -> "PrefixEntry":
        """The entry stored under `key`; ValueError when it is damaged."""
        if not isinstance(raw, dict):
            raise ValueError("the prefix entry is not a JSON object")
        ids, chunks = raw.get("token_ids"), raw.get("chunks")
        if not _ids(ids) or not (isinstance(chunks, list) and all(isinstance(k, str) for k in chunks)):
            raise ValueError("the prefix entry's token ids or chunks are damaged")
        return cls(key=key, token_ids=ids, chunks=chunks,
                   fingerprint=raw["fingerprint"] if isinstance(raw.get("fingerprint"), str) else None,
                   chunk_tokens=raw.get("chunk_tokens") if type(raw.get("chunk_tokens")) is int else None,
                   state=StateEntry.parse(raw.get("state")), last_used=_number(raw.get("last_used")) or 0.0,
                   format=raw["format"] if type(raw.get("format")) is int else None)

    def to_json(self) -> dict[str, Any]:
        """The entry as written to .kv/prefixes/KEY.json."""
        return {"format": self.format, "fingerprint": self.fingerprint, "chunk_tokens": self.chunk_tokens,
                "token_ids": self.token_ids, "chunks": self.chunks,
                "state": self.state.to_json(with_pin=False) if self.state else None, "last_used": self.last_used}


@dataclass
class References:
    """Every KV file some record may use: chunk keys, session tail and state keys by session, shared state keys."""

    chunks: set[str] = field(default_factory=set)
    tails: set[tuple[str, str]] = field(default_factory=set)  # (session name, key)
    session_states: set[tuple[str, str]] = field(default_factory=set)
    shared_states: set[str] = field(default_factory=set)


def kv_references(raw: Any, session: str | None, into: References) -> None:
    """Add the KV files a record lists to `into`, reading it loosely on purpose: prune keeps whatever even a
    damaged (but perhaps recoverable) record names. `session` is the session's name, None for a prefix entry.
    Only keys that could name a file are kept."""
    if not isinstance(raw, dict):
        return
    chunks = raw.get("chunks")
    if isinstance(chunks, list):
        into.chunks.update(k for k in chunks if is_key(k))
    shared = raw.get("state")
    if isinstance(shared, dict) and is_key(shared.get("key")):
        into.shared_states.add(shared["key"])
    if session is None:
        return
    tail = raw.get("tail")
    if isinstance(tail, dict) and is_key(tail.get("key")):
        into.tails.add((session, tail["key"]))
    states = raw.get("states")
    for entry in states if isinstance(states, list) else []:
        if isinstance(entry, dict) and is_key(entry.get("key")):
            into.session_states.add((session, entry["key"]))
