"""Built-in filters and the filter registry.

:func:`find_filter` resolves a short filter name (``pynbd serve --filter=NAME``): first the
built-in filters of this package (each public module ``NAME.py``, ``-`` in a name written
``_``, defines the filter class whose ``name`` is ``NAME``), then third-party filters registered under the
``pynbd.filters`` entry point group::

    [project.entry-points."pynbd.filters"]
    myfilter = "mypackage.myfilter:MyFilter"
"""

from __future__ import annotations

from pynbd.plugin import Filter
from pynbd.plugins import _lookup, builtins_in

__all__ = ["BUILTIN_FILTERS", "find_filter"]

#: Built-in filters: short name -> module (imported on first use).
BUILTIN_FILTERS: dict[str, str] = builtins_in(__name__, __path__)

_GROUP = "pynbd.filters"


def find_filter(name: str) -> type[Filter]:
    """The filter class called ``name``: a built-in, else a ``pynbd.filters`` entry point.

    Raises :class:`~pynbd.errors.ConfigError` ``unknown filter 'NAME'`` if there is none.
    """
    return _lookup("filter", _GROUP, BUILTIN_FILTERS, name, Filter)  # type: ignore[return-value]
