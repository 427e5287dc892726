"""What the front's handlers mark on a request as it goes (aiohttp's request keys): read by
the handlers, the body reader (``bodies``) and the admission (``admission``)."""

from __future__ import annotations

from aiohttp import web

# on the request, once a stream's head is sent: the stream, and how it ended when that is not
# its response's status (an error event at its end; the caller gone)
STREAM = web.RequestKey("cachemesh.stream", web.StreamResponse)
ENDED = web.RequestKey("cachemesh.ended", int)
# on the request once a write to the caller outlasted HTTP_FRONT_WRITE_TIMEOUT_S: its connection
# is closed when the handler has unwound (its Gateway call cancelled on the way)
STALLED = web.RequestKey("cachemesh.stalled", bool)
# on the request once the Gateway has answered (its end, or a stream's start: the model call
# is then billed, cut or not): a failure of the front after that says x-should-retry: false
ANSWERED = web.RequestKey("cachemesh.answered", bool)
# on the request once its body outlasted HTTP_FRONT_BODY_TIMEOUT_S: its 408 goes out, then its
# connection is closed (aiohttp would read what is left of the body for up to 10 s more)
BODY_CUT = web.RequestKey("cachemesh.body_cut", bool)
# on the request once its key names a tenant: the tenant (its refusal's access line says it)
TENANT = web.RequestKey("cachemesh.tenant", str)
# on the request once its Gateway call begins (a refusal before that is the front's own)
CALLED = web.RequestKey("cachemesh.called", bool)
# on the request once the Gateway showed it has the call (its answer or a stream's first
# message, or a status it sent: the router sends nothing before them, initial metadata
# neither): the router writes its access line from then on; a request without it has the
# front's line (``access_log``), even once CALLED (a caller gone before the router had the call
# or while it had sent nothing yet; a Gateway never reached)
REACHED = web.RequestKey("cachemesh.reached", bool)
# on the request before its key is checked, when the caller chose its id (a valid
# ``Idempotency-Key``): the id the Gateway knows it by, which a refusal's response names too
CALLER_ID = web.RequestKey("cachemesh.caller_id", str)
# on the request once its body is read: its size in bytes (``bodies._translated``)
BODY_BYTES = web.RequestKey("cachemesh.body_bytes", int)
# on an Anthropic request once its anthropic-version is checked: the version it is served as
# (``admission.AnthropicVersions.served``), which decides the fields its body may carry
ANTHROPIC_VERSION = web.RequestKey("cachemesh.anthropic_version", str)
