"""The sans-IO NBD protocol core, shared by the server and the client.

Nothing here imports socket, asyncio, ssl, threading or selectors: bytes in, events out.
"""

from pynbd.protocol.constants import *
from pynbd.protocol.constants import __all__ as _constants_all

__all__ = list(_constants_all)
