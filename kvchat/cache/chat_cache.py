"""The cache of one conversation: the model's cache layers, the exact token ids they hold, the recurrent-state
checkpoints a chat comes back to, and the next-token logits at the end of the last prompt.

Its methods are the only way to change it, and each one keeps its invariant: every token count its layers keep
equals the tokens it says it holds (`check`). A change that cannot be made exactly is refused (the cache is then
forgotten, and says why) rather than made approximately.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch

from kvchat.cache import layers
from kvchat.cache.kv_forms import KVForm
from kvchat.cache.layers import Layout

MAX_CHECKPOINTS = 8  # recurrent-state snapshots kept in memory: pinned ones (the system prompt's) and the latest

T = TypeVar("T")


@dataclass(eq=False)
class Checkpoint:
    """The conv/recurrent state after the first `tokens` cached tokens (a copy, on the cache's device).

    `logits` [vocab] are the next-token logits at that point when they were kept (the end of a prompt).
    """

    tokens: int
    state: dict[str, Any]
    logits: Any = None
    pinned: bool = False  # never evicted for newer ones (the end of the system prompt)


class CacheSpec:
    """What every cache of one loaded model is made from: the model (its config and where its layers run), how
    sliding-window layers are kept, and the `Layout` one probe pass found.

    Raises `layers.Unsupported` for a model whose cache kvchat cannot keep exactly.
    """

    def __init__(self, model: Any, device: torch.device, windows: str = layers.WINDOWS_FULL,
                 form: KVForm = KVForm()):
        self.model = model
        self.device = device
        self.windows = windows  # layers.WINDOWS_FULL or WINDOWS_ONLY
        self.form = form  # what the keys and values are kept in
        self.layout: Layout = layers.layout(model, device, windows)
        self.layout.kv_form = form.name
        if not form.exact:
            probe, _ = layers.one_token(model, device, windows, form)
            refusal = layers.form_refusal(probe, form)
            if refusal is not None:
                raise layers.Unsupported(f"its cache cannot keep keys and values in {form.name}: {refusal}")

    def empty(self) -> Any:
        """A new, empty transformers cache laid out for the model."""
        return layers.new_cache(self.model, self.windows, self.form)


class ChatCache:
    """The KV cache of one conversation (see the module docstring)."""

    def __init__(self, spec: CacheSpec):
        self.spec = spec
        self._cache: Any = None  # a transformers Cache, made when first needed
        self._ids: list[int] = []
        self._checkpoints: list[Checkpoint] = []
        self._logits: tuple[int, torch.Tensor] | None = None  # next-token logits after the first n tokens
        # Why the cache was last forgotten instead of cut (a restored checkpoint that did not hold what it should),
        # until the next turn takes it to report it.
        self.refusal: str | None = None
        self.loaded = 0  # tokens that came from disk and no turn has reported yet

    # -- what it holds -------------------------------------------------------------------------

    @property
    def layout(self) -> Layout:
        return self.spec.layout

    @property
    def ids(self) -> tuple[int, ...]:
        """The token ids whose KV (and state) the cache holds, in order."""
        return tuple(self._ids)

    @property
    def tokens(self) -> int:
        return len(self._ids)

    @property
    def model_cache(self) -> Any:
        """The transformers cache that the model's forward pass takes (made empty when there is none). Only
        `feed` may run a pass on it."""
        if self._cache is None:
            self._cache = self.spec.empty()
        return self._cache

    @property
    def checkpoints(self) -> tuple[Checkpoint, ...]:
        """The state snapshots kept, oldest first."""
        return tuple(self._checkpoints)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors its layers hold (checkpoints not counted)."""
        return layers.nbytes(self._cache) if self._cache is not None else 0

    @property
    def has_state(self) -> bool:
        """Whether some layer keeps a conv/recurrent state, which cannot be cut back (before the first pass: whether
        the model's layout says one will)."""
        return layers.has_state(self._cache) if self._cache is not None else self.layout.has_state

    def unsupported(self) -> str | None:
        """Why the cache cannot be cut, snapshotted or saved exactly, or None."""
        return layers.unsupported(self._cache) if self._cache is not None else None

    def can_export(self) -> bool:
        return self._cache is not None and layers.can_export(self._cache)

    def logits_at(self, n: int) -> torch.Tensor | None:
        """The next-token logits after the first `n` tokens, when they were kept (the end of a prompt)."""
        return self._logits[1] if self._logits is not None and self._logits[0] == n else None

    def checkpoint_at(self, n: int) -> Checkpoint | None:
        return next((c for c in self._checkpoints if c.tokens == n), None)

    def check(self) -> None:
        """Assert the invariant: every token count the layers keep is the number of tokens held."""
        if self._cache is not None:
            wrong = layers.miscount(self._cache, len(self._ids))
            assert wrong is None, wrong

    def take_refusal(self) -> str | None:
        """Why the cache was last forgotten, once (the next turn reports it)."""
        refusal, self.refusal = self.refusal, None
        return refusal

    def take_loaded(self) -> int:
        """Tokens loaded from disk since last asked."""
        loaded, self.loaded = self.loaded, 0
        return loaded

    # -- changing it ---------------------------------------------------------------------------

    def drop(self) -> None:
        """Forget everything (the next turn prefills from scratch)."""
        self._cache = None
        self._ids = []
        self._checkpoints = []
        self._logits = None
        self.loaded = 0

    def feed(self, ids: list[int], forward: Callable[[Any, int], T]) -> T:
        """Run `forward(model_cache, start)`, a forward pass that adds exactly `ids` to the cache at position
        `start`, and record them; return what it returns.

        When the pass raises (Ctrl-C included), the cache goes back to what it held before (the attention layers
        cut, a state restored from its checkpoint, or, when neither is exact, forgotten) and the error propagates.
        """
        start = len(self._ids)
        model_cache = self.model_cache
        try:
            result = forward(model_cache, start)
        except BaseException:
            # (a state may have taken part of the pass without its count showing it: always go back)
            if self.unsupported() is None:
                self._back_to(start)
            else:
                self.drop()
            raise
        self._ids.extend(ids)
        return result

    def trim(self, n: int) -> int:
        """Keep at most the first `n` tokens, exactly; return how many are kept.

        Attention layers are cut at `n`. A cache with recurrent state goes back to its latest checkpoint at or
        before `n` (a state cannot be cut). With no such point, or layers kvchat does not know, the cache is
        forgotten and 0 returned; so it is when the cut layers' counts do not all come to the kept length
        (`refusal` then says why).
        """
        if self._cache is None or n <= 0 or self.unsupported() is not None:
            self.drop()
            return 0
        if n >= len(self._ids):
            return len(self._ids)
        return self._back_to(n)

    def restore_checkpoint(self, n: int) -> Checkpoint | None:
        """Put back the state of the latest checkpoint at or before `n` tokens (dropping the later ones), or
        return None when there is none. The attention layers and ids are `trim`'s to cut to its tokens."""
        usable = [c for c in self._checkpoints if c.tokens <= min(n, len(self._ids))]
        if not usable:
            return None
        point = usable[-1]
        layers.import_state(self._cache, point.state)
        self._checkpoints = [c for c in self._checkpoints if c.tokens <= point.tokens]
        if point.logits is not None:
            self._logits = (point.tokens, point.logits)
        return point

    def _back_to(self, n: int) -> int:
        """Cut to `n` tokens (or the latest checkpoint before them); forget the cache when that is not exact."""
        if layers.has_state(self._cache):
            point = self.restore_checkpoint(n)
            if point is None:
                self.drop()
                return 0
            n = point.tokens
        layers.truncate(self._cache, n)
        del self._ids[n:]
        if self._logits is not None and self._logits[0] > n:
            self._logits = None
        wrong = layers.miscount(self._cache, n)
        if wrong is not None:  # never continue from a cache that is not what the tokens say
            self.drop()
            self.refusal = wrong
            return 0
        return n

    def checkpoint(self, logits: torch.Tensor | None = None, pin: bool = False) -> None:
        """Remember where the cache stands: the next-token `logits` here, when given (the end of a prompt: a
        /retry prefills nothing), and for a cache with recurrent state a snapshot of it, which a later `trim`
        comes back to. Beyond MAX_CHECKPOINTS the oldest unpinned snapshot goes."""
        n = len(self._ids)
        if logits is not None:
            self._logits = (n, logits)
        if self._cache is None or not n or not self.has_state or self.unsupported() is not None:
            return  # (a cache kvchat cannot snapshot is never cut back: no use for one)
        same = self.checkpoint_at(n)
        if same is not None:  # the same tokens, so the same state (an empty reply ends where its prompt did)
            same.logits = same.logits if logits is None else logits
            same.pinned = same.pinned or pin
            return
        self._checkpoints.append(Checkpoint(n, layers.export_state(self._cache, device=None), logits, pin))
        self._checkpoints.sort(key=lambda c: c.tokens)
        unpinned = [i for i, c in enumerate(self._checkpoints) if not c.pinned]
        if len(self._checkpoints) > MAX_CHECKPOINTS and unpinned:
            del self._checkpoints[unpinned[0]]

    # -- to and from the store -----------------------------------------------------------------

    def export(self, start: int, end: int) -> dict[str, torch.Tensor]:
        """Tokens [start, end) of every attention layer as CPU tensors (see `layers.export`)."""
        assert self.can_export(), "export() called on a cache that cannot be saved exactly"
        return layers.export(self._cache, start, end)

    def export_state(self) -> dict[str, Any]:
        """The state of every state and window layer now, copied to the CPU (see `layers.export_state`)."""
        return layers.export_state(self._cache)

    def adopt(self, ids: list[int], pieces: list[dict[str, torch.Tensor]], state: dict[str, Any] | None,
              checkpoints: list[Checkpoint] = (), from_disk: bool = True) -> str | None:
        """Take as the cache's whole content the KV `pieces` (exported, in order) and state snapshot `state` that
        hold `ids`, with earlier `checkpoints`; None when it holds exactly `ids`, else why not (the cache is then
        left as it was). A cache with state gets a checkpoint at its end, so a later cut can come back to it."""
        restored = layers.restore(self.spec.model, pieces, self.spec.device, state, self.spec.windows,
                                  self.spec.layout)
        wrong = layers.miscount(restored, len(ids))
        if wrong is not None:
            return wrong
        self.drop()
        self._cache, self._ids = restored, list(ids)
        device = self.spec.device  # (read from disk on the CPU: kept where the cache lives)
        self._checkpoints = sorted((Checkpoint(c.tokens, {k: _to(v, device) for k, v in c.state.items()},
                                               _to(c.logits, device), c.pinned) for c in checkpoints),
                                   key=lambda c: c.tokens)
        with_logits = [c for c in self._checkpoints if c.logits is not None]
        if with_logits:  # the last prompt's next-token logits: a /retry right after resuming prefills nothing
            self._logits = (with_logits[-1].tokens, with_logits[-1].logits)
        self.checkpoint()
        self.loaded = len(ids) if from_disk else 0
        return None


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value
