"""The states of a handle, as libnbd names and describes them, and the sets of states each
call accepts."""

from __future__ import annotations

__all__ = [
           "CLOSED",
           "CONNECTING",
           "CREATED",
           "DEAD",
           "NEGOTIATING",
           "READY",
           "STATE_DESC",
           "STATE_TEXT",
           "ST_CONN",
           "ST_CREATED",
           "ST_CREATED_NEG",
           "ST_INFLIGHT",
           "ST_INFO",
           "ST_NEG",
           "ST_URI",
]

CREATED, CONNECTING, NEGOTIATING, READY, CLOSED, DEAD = (
    "created", "connecting", "negotiating", "ready", "closed", "dead")

STATE_TEXT = {
    CREATED: ("START", "Handle after being initially created"),
    CONNECTING: ("CONNECT.START", "Initial call to connect(2) on the socket"),
    NEGOTIATING: ("NEGOTIATING", "Connection is ready to negotiate an NBD option"),
    READY: ("READY", "Connection is ready to process NBD commands"),
    CLOSED: ("CLOSED", "Connection is closed"),
    DEAD: ("DEAD", "Connection is in an unrecoverable error state, can only be closed"),
}
STATE_DESC = [(CREATED, "newly created"), (CONNECTING, "connecting"),
              (NEGOTIATING, "negotiating"), (READY, "connected with the server"),
              (CLOSED, "shut down"), (DEAD, "dead")]

ST_CREATED = frozenset({CREATED})
ST_CREATED_NEG = frozenset({CREATED, NEGOTIATING})
ST_NEG = frozenset({NEGOTIATING})
ST_INFO = frozenset({NEGOTIATING, READY, CLOSED})
ST_CONN = frozenset({READY})
ST_INFLIGHT = frozenset({READY, CLOSED, DEAD})
ST_URI = frozenset({CONNECTING, NEGOTIATING, READY, CLOSED, DEAD})
