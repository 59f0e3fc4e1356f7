"""The compiled one-token decode step: torch.compile over a static view of kvchat's cache (`layers.one_step`).

Only decoding is compiled; prefill stays eager. The step is compiled once per loaded model (its capacity
dimension is dynamic, so a growing cache does not recompile), in a background thread (a forward pass sent
meanwhile waits for it, see `CompiledStep.exclusive`; tokens decode eagerly until it is ready), and inductor
keeps what it built in its cache directory (the command line points it at $KVCHAT_HOME/compiled, see
`cache_directory`), so a later start compiles in a fraction of the time. On CUDA the
step is captured as a CUDA graph ("reduce-overhead"). A step that cannot be compiled, or fails, is reported once
and decoding goes on eagerly with nothing lost.
"""

from __future__ import annotations

import os
import threading
import time
import types
import weakref
from typing import Any

import torch

from kvchat.cache import layers
from kvchat.config import COMPILE, check_own_dir, kvchat_home


ATTENTION = "kvchat_static_sdpa"  # the name kvchat's attention is registered under, selected per compiled model


def _static_sdpa(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                 **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention, except in a compiled one-token step on the CPU: query [1, heads, 1, dim] over
    the whole static buffers [1, kv_heads, capacity, dim] with the mask hiding spare slots, where transformers
    would repeat every key/value head for its query heads (a copy of the whole cache per layer and step);
    grouped-query attention reads them as they are."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if (torch.compiler.is_compiling() and query.device.type == "cpu" and query.shape[2] == 1
            and attention_mask is not None and dropout == 0.0 and key.shape[1] != query.shape[1]
            and kwargs.get("position_bias") is None and kwargs.get("softcap") is None
            and getattr(module, "num_key_value_groups", 1) > 1):
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                               scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None  # [1, 1, heads, dim]
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def use_static_attention(model: Any) -> bool:
    """Make `model` (one that runs transformers' "sdpa" attention) run `_static_sdpa` instead, under kvchat's own
    name with sdpa's masks; other models and transformers' own "sdpa" are left as they are. Returns whether it
    did."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    if ATTENTION not in ALL_ATTENTION_FUNCTIONS:  # (a new name beside transformers' own, never replacing one)
        AttentionInterface.register(ATTENTION, _static_sdpa)
        AttentionMaskInterface.register(ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model.set_attn_implementation(ATTENTION)
    return True


def cache_directory() -> dict[str, str]:
    """The environment that points inductor at kvchat's own cache of compiled code ($KVCHAT_HOME/compiled), unless
    the user chose another: for the command line to set once, before anything compiles."""
    if "TORCHINDUCTOR_CACHE_DIR" in os.environ:
        return {}
    check_own_dir(kvchat_home(), "its home ($KVCHAT_HOME)")
    check_own_dir(kvchat_home() / "compiled", "its home's compiled folder")
    return {"TORCHINDUCTOR_CACHE_DIR": str(kvchat_home() / "compiled")}


def wanted(setting: str, device: torch.device) -> bool:
    """Whether `compile = setting` compiles the decode step on `device`: "auto" does on CUDA (where the step's
    cost is launching kernels, which a CUDA graph removes) and not on the CPU (where it measured 1.1-1.3x
    faster with packed weights, no faster with float32 ones, after a compile of about 50 s on two cores the
    first time and 10 s later, which a reply sent meanwhile waits for: docs/benchmarks.md)."""
    assert setting in COMPILE, f"unknown compile setting {setting!r}"
    return setting == "on" or (setting == "auto" and device.type == "cuda")


class CompiledStep:
    """Runs one token through `model` on top of a cache, compiled. A call returns None when the step is not
    (or not yet) compiled, and the caller runs the token eagerly; the cache is then as it was."""

    def __init__(self, model: Any, device: torch.device):
        use_static_attention(model)
        self._model = weakref.ref(model)  # (held weakly: a step never keeps its model alive)
        self._kwarg = layers.cache_kwarg(model)
        self._ids: torch.Tensor | None = None  # [1, 1], refilled every step (no allocation per token)
        self.failure: str | None = None  # why compiling (or a compiled step) failed, once it has
        self.refused: str | None = None  # why the model's cache cannot take a static step (found by the warm-up)
        self.ready = False  # a step has run compiled
        self._warming: threading.Thread | None = None
        # One use of the model at a time while a step exists: a compiled call (the warm-up's compile included) and
        # the engine's eager passes (see `exclusive`).
        self._lock = threading.Lock()
        # The model's weights never change once loaded, so its modules need no guards (they cost ~2 ms a step).
        # Dynamo keeps what it compiled on the function's code object; without those guards, a graph traced for
        # one model would be offered to the next of the same class (another weight form, another config) in the
        # same process, so each step gets a code object of its own.
        step = types.MethodType(types.FunctionType(CompiledStep._step.__code__.replace(), globals()), self)
        self._compiled = torch.compile(step, fullgraph=True,
                                       mode="reduce-overhead" if device.type == "cuda" else None,
                                       options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})

    @property
    def model(self) -> Any:
        """The model the step runs (None once it is freed)."""
        return self._model()

    def _step(self, ids: torch.Tensor, position: torch.Tensor, cache: Any) -> torch.Tensor:
        out = self._model()(input_ids=ids, position_ids=position, use_cache=True, logits_to_keep=1,
                            **{self._kwarg: cache})
        return out.logits[0, -1]  # [vocab]

    def __call__(self, cache: Any, token_id: int) -> torch.Tensor | None:
        """The next-token logits [vocab] after `token_id`, with the token added to `cache`; None (cache untouched)
        while the step is compiled in the background, when this cache cannot take a static step (recurrent
        state, window-only layers), or once compiling failed."""
        if self.failure is not None or self.refused is not None or (self._warming is not None and not self.ready):
            return None
        if layers.static_refusal(cache) is not None:
            return None
        with self._lock:
            return self._run(cache, token_id)

    def _run(self, cache: Any, token_id: int) -> torch.Tensor | None:
        try:
            with layers.one_step(cache) as position:
                if self._ids is None or self._ids.device != position.device:
                    self._ids = torch.zeros((1, 1), dtype=torch.long, device=position.device)
                self._ids.fill_(token_id)
                logits = self._compiled(self._ids, position, cache)
        except (torch._dynamo.exc.TorchDynamoException, NotImplementedError, RuntimeError, AssertionError) as exc:
            self.failure = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            return None
        self.ready = True
        return logits.clone() if logits.is_cuda else logits  # a CUDA graph writes its next output in the same memory

    def warm_up(self, background: bool = True) -> None:
        """Compile the step now on a scratch cache of one token (in a thread with `background`), so that the
        conversation's first replies do not wait for it."""
        if self.ready or self.failure is not None or self.refused is not None or self._warming is not None:
            return
        if background:
            self._warming = threading.Thread(target=self._warm, name="kvchat-compile", daemon=True)
            self._warming.start()
        else:
            self._warm()

    def _warm(self) -> None:
        with torch.inference_mode(), self._lock:
            model = self._model()
            scratch, _ = layers.one_token(model, next(model.parameters()).device)
            self.refused = layers.static_refusal(scratch)
            if self.refused is None:
                self._run(scratch, 0)

    def exclusive(self) -> threading.Lock:
        """Held around every eager pass through the model: a compile in the background never overlaps one. While
        anything compiles, transformers' hub-kernels layer keeps its active functions in a process-wide variable
        that eager passes write too, and dynamo then failed its own guards (the step was lost for the session).
        An eager pass sent during the warm-up waits for it (it mostly did anyway: both want the same cores)."""
        return self._lock

    def wait(self) -> None:
        """Block until a background warm-up has finished."""
        if self._warming is not None:
            self._warming.join()

    def compile_now(self) -> float:
        """Compile the step before anything is timed (a benchmark's way; a chat compiles in the background);
        returns the seconds it took."""
        began = time.perf_counter()
        self.warm_up(background=False)
        return time.perf_counter() - began

    def label(self) -> str:
        """What a benchmark row says of the step: ", compiled step", or why it ran eagerly."""
        if self.ready:
            return ", compiled step"
        return f", compiled step failed ({self.failure or self.refused}; ran eagerly)"


def refusal(model: Any) -> str | None:
    """Why `model`'s cache cannot take a compiled step (recurrent state, window-only or shared layers), or None."""
    return layers.static_refusal(layers.one_token(model, next(model.parameters()).device)[0])
