"""The terms of a model replica's tenant-fair queue (``services/model/fair_queue.py``: deficit
round robin by the tokens each call asks of the engine), in one place for the queue and for
the router, which predicts a request's turn in it (``services/router/replica_state.py``)."""

from __future__ import annotations

MIN_COST = 16  # tokens: one KV block; a call whose prompt the cache holds whole is not free
QUANTUM = 256  # tokens added to a waiting tenant's deficit at each of its turns
