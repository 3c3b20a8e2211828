"""Regenerate the README's screenshots (``docs/images/*.png``) from one run of the browser test.

    GROUNDUP_SHARED_DIR=../shared python docs/screenshots.py

``tests/test_browser.py`` starts a Prefect and an MLflow server on loopback, serves the deployments on tiny
settings, starts the pipeline from the Prefect UI's run form and clicks through the lineage in the MLflow
UI; with ``GROUNDUP_SCREENSHOTS_DIR`` set it copies the README's images there. Needs Debian's ``chromium``
and Playwright (the ``dev`` extra).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "docs" / "images"


def main() -> int:
    from tests.test_browser import README_IMAGES

    started = time.time()
    env = {**os.environ, "GROUNDUP_SCREENSHOTS_DIR": str(IMAGES)}
    command = [sys.executable, "-m", "pytest", "tests/test_browser.py", "-q", "-rs", "-p", "no:cacheprovider"]
    code = subprocess.call(command, cwd=ROOT, env=env)
    stale = [name for name in README_IMAGES.values() if (IMAGES / name).stat().st_mtime < started]
    if code or stale:  # a skipped test (no chromium, no shared data) passes but writes nothing
        print(f"screenshots not regenerated: {', '.join(stale) or 'the browser test failed'}", file=sys.stderr)
        return code or 1
    print("regenerated " + ", ".join(str(IMAGES / name) for name in README_IMAGES.values()))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
