#!/usr/bin/env python3
"""A screenshot of the page of `pynbd view --replay RECORDING`, in headless chromium.

    page-shot.py RECORDING OUT.png [pynbd view options...]
"""

from __future__ import annotations

import subprocess
import sys

from playwright.sync_api import sync_playwright


def main(recording: str, out: str, options: list[str]) -> None:
    viewer = subprocess.Popen([sys.executable, "-m", "pynbd", "view", "--replay", recording,
                               "--speed", "0", *options], stdout=subprocess.PIPE)
    try:
        assert viewer.stdout is not None
        url = viewer.stdout.readline().decode().split()[-1]
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium",
                                         args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 900, "height": 560})
            page.goto(url)
            page.wait_for_function("window.pynbdView && window.pynbdView.ready")
            page.wait_for_timeout(500)
            page.screenshot(path=out)
            browser.close()
    finally:
        viewer.terminate()
        viewer.wait()


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: page-shot.py RECORDING OUT.png [pynbd view options...]")
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
