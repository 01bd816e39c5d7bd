"""Silencing two notices that torch prints on behalf of lipsim's own, correct calls.

* ``torch.func.jvp`` loads torch's forward-AD decompositions on first use, which call
  ``torch.jit.script`` inside torch and raise its deprecation ``FutureWarning`` (``lipsim
  verify``, power iteration): nothing the user or lipsim calls is deprecated.
* ``torch.load(weights_only=True)`` warns about any pickle protocol other than 2 before it
  refuses or reads the file; lipsim already answers with one line of its own.

Only these messages are filtered, only inside the block; every other warning still shows.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

__all__ = ["torch_notices_off"]

#: (category, regular expression of the message) of the notices filtered
NOTICES = (
    (FutureWarning, r"`torch\.jit\.script` is deprecated"),
    (UserWarning, r"Detected pickle protocol \d+ in the checkpoint"),
)


@contextlib.contextmanager
def torch_notices_off() -> Iterator[None]:
    """Within the block, the torch notices of :data:`NOTICES` are not shown."""
    with warnings.catch_warnings():
        for category, message in NOTICES:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield
