"""kvchat: a terminal chat for open-weight models that keeps its KV cache across turns."""

__version__ = "0.1.0"
