"""How long work reports its progress: through a hook its caller passes in.

The executor, the checksum check and the conversion call `progress(step, done, total)`; the command line draws
it (rich, on stderr, only on a terminal) and anything else may record it. Nothing that reports imports rich.
`total` 0 means "not known yet" (a spinner); every step counts bytes except "folding", which counts table rows.
"""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str, int, int], None]  # (step, done, total)

# step -> (what the user sees, unit), in the order a conversion meets them
STEPS: dict[str, tuple[str, str]] = {
    "resolving": ("finding the checkpoint", ""),  # a Hub download: huggingface_hub draws its own bars
    "reading": ("reading layer 0's weights", "bytes"),
    "folding": ("folding layer 0 into the table", "rows"),
    "copying": ("copying the other tensors", "bytes"),
    "writing": ("writing the table", "bytes"),
    "hashing": ("hashing", "bytes"),
}
