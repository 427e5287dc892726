"""One access-log line for each request the front refuses itself, before the Gateway sees it.

The router writes one line per Gateway call (``services.router.access_log``). A request the
front answers with its own refusal never reaches it: no or an unknown key (401), the
tenant's in-flight cap on this front (429), a request over ``HTTP_FRONT_MAX_BODY_BYTES`` (413)
or too slow to come (408), a body with no room in ``HTTP_FRONT_BODY_BUDGET_BYTES`` (529 /
503), a body or header it cannot read (400), a model it does not list (404), its own failure
before the call (500). Such a request had only its span and metric;
its line here has the router's logger (``cachemesh.access``), message (``access``) and
fields: ``tenant`` (empty when the key was refused), ``request_id`` (the id the refusal's
response carries in ``request-id`` / ``x-request-id``), ``method`` (the HTTP method and
route), ``requested_model`` (``?``: not read, as the router's line of a request it could not
parse), ``status`` (the gRPC code of the same meaning, so one ``jq`` reads both services'
lines), ``duration_ms``; and ``http_status`` and ``refused_by`` (``http-front``). A
``DEADLINE_EXCEEDED`` line (a body too slow) says ``"deadline":"client"``, as the router's
does of a caller's deadline. A refusal its caller did not take (it stopped reading, or went
away, while the refusal went out) says ``http_status`` 499, as the metric counts it, beside the
refusal's ``status``. Never the key (not even a part of it), nor the request's text.

A request whose caller went away before the front called the Gateway (its body half sent) has
its line here too (``CANCELLED``, ``http_status`` 499; ``handlers.Front._gone``): no router saw
it, and it had no line anywhere. So does one whose Gateway call began but the Gateway never
showed it had it (``handlers.REACHED``: no message or status from it): a
caller gone in the millisecond before the router's handler began (the cancel beat the call, and
the router never ran it), or a Gateway not reached (``UNAVAILABLE``, 529 / 503). Such a line
says ``"gateway_replied":false``: a caller gone while the router had the call but had sent
nothing yet (its key and limits, its L1 lookup, a wait on an identical call, the model's first
token: the router sends nothing before its answer, lest it commit the gRPC call against a
client's retry) has the router's line too (the same ``trace_id``, and ``request_id`` when the
caller chose it).
"""

from __future__ import annotations

import json
import logging
from json.encoder import encode_basestring as _escape

from services.common.errors import Code
from services.common.logs import JsonLines
from services.http_front.facts import MAX_ID_CHARS

access = logging.getLogger("cachemesh.access")
REFUSED_BY = "http-front"


class RefusalLog:
    def __init__(self, lines: JsonLines | None = None) -> None:
        """``lines``: the direct writer of JSON lines (``configure_logging``'s); None = through
        the logging module (the text format, tests)."""
        self._lines = lines

    def refused(
        self,
        tenant: str,
        request_id: str,
        method: str,
        code: Code,
        http_status: int,
        seconds: float,
        gateway_called: bool = False,
    ) -> None:
        """The line of one request the front refused; ``code``: the gRPC code of its HTTP
        status's meaning (``errors.ApiError.code``); ``gateway_called``: its Gateway call had
        begun, and no reply came (``"gateway_replied":false`` on the line)."""
        if not access.isEnabledFor(logging.INFO):
            return
        members = (
            f',"tenant":{_escape(tenant)},"request_id":{_escape(request_id[:MAX_ID_CHARS])},'
            f'"method":{_escape(method)},"requested_model":"?","status":"{code.name}",'
            f'"duration_ms":{round(seconds * 1000, 3)!r}'
        )
        if code is Code.DEADLINE_EXCEEDED:
            members += ',"deadline":"client"'
        members += f',"http_status":{http_status},"refused_by":"{REFUSED_BY}"'
        if gateway_called:
            members += ',"gateway_replied":false'
        if self._lines is not None:
            self._lines.write(access.name, "access", members)
        else:  # the text format: the same fields, through the logging module
            access.info("access", extra={"fields": json.loads("{" + members[1:] + "}")})
