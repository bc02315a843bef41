"""Lookup of a compiled model's sharding context by its tag.

Marker ops carry a ``tag`` string that names the context of the model they
belong to; their implementations and the passes find the context here. Each
model has its own tag, so two compiled models never share state. Entries are
weak: a context lives exactly as long as its model.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any

# tag -> the model's runtime state (zerograph.runtime.state); typed loosely so
# this module imports nothing of zerograph's
_contexts: "weakref.WeakValueDictionary[str, Any]" = weakref.WeakValueDictionary()
_counter = itertools.count()


def new_tag() -> str:
    return f"zg{next(_counter)}"


def register(ctx: Any, tag: str | None = None) -> None:
    """Register ``ctx`` under its tag (or an alias of it: one context may be
    named by several tags, e.g. its no-sync variant)."""
    _contexts[tag or ctx.tag] = ctx


def lookup(tag: str) -> Any:
    try:
        return _contexts[tag]
    except KeyError:
        raise RuntimeError(
            f"zerograph context {tag!r} is gone: the model it belongs to was garbage-collected; "
            "keep a reference to the model returned by zerograph.compile"
        ) from None
