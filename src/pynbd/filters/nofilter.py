"""The nofilter filter: a layer that changes nothing. Its manual page is
:class:`NofilterFilter`'s docstring."""

from __future__ import annotations

from pynbd.plugin import Filter

__all__ = ["NofilterFilter"]


class NofilterFilter(Filter):
    """NAME
        nofilter - pynbd passthrough filter

    SYNOPSIS
        pynbd serve --filter=nofilter PLUGIN [PLUGIN-ARGS...]

    DESCRIPTION
        nofilter passes every request through unchanged. It is mostly useful for testing
        the server, and for measuring what a filter layer costs.

        It never blocks: with a plugin that runs on the event loop (memory, null...) the
        whole chain stays on the loop.

        This is nbdkit-nofilter-filter(1) for pynbd. It has no parameters: every parameter
        goes to the plugin.

    PARAMETERS
        None of its own.

    EXAMPLES
        A memory disk with one filter layer in between:

            pynbd serve --filter=nofilter memory 1G
    """

    name = "nofilter"
    nonblocking = True
