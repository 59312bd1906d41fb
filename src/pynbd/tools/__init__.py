"""libnbd's everyday tools over pynbd's client: ``pynbd info|copy|sh|dump|fuse``.

Each module here has ``main(argv: list[str]) -> int`` and is a thin command over the library.
"""
