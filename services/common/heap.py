"""The start-up heap, kept out of the cyclic garbage collector's full passes.

A service's start-up leaves a heap of long-lived objects (the imported modules, the
tokenizers' tables, the models' wrappers, restored cache entries): about 10^5 to 10^6 of
them. Every full (generation 2) collection walks them all, and a full collection runs on the
event loop whenever what survived since the last one passes a quarter of that heap: measured
on a bench stack (2 cores, ``make bench``'s exact-hit case) at 100-170 ms a pass, three times in
about 9,000 requests in the router and twice in semantic-cache; every call in flight waited
through each pass (the max latency at one in flight 112-139 ms against a p50 of 2.6-2.8 ms).

``freeze_startup_heap`` collects what start-up left as garbage, then moves the rest to the
permanent generation (``gc.freeze``): later full passes walk only what was made since. Frozen
objects are still freed by reference counting when their last reference goes (an evicted
cache entry, a closed channel); only a reference cycle among them would stay, and start-up
state is the process's own for its whole life.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> int:
    """Collects start-up's garbage, freezes what is left; returns the objects frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
