"""Render a store's HTML report and take a screenshot of it in headless Chromium, to look at the page
as a reader will (not part of the tests: it needs a browser).

    python bench/report_screenshot.py demo-output/store.zarr --out-dir /tmp/report-shot

Chromium runs with networking features off and a throw-away profile, so a page that asked for
anything outside itself would show it as a broken image rather than quietly fetch it.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

from pipelines.report.html import write_report

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def screenshot(page: Path, png: Path, width: int = 1280, height: int = 2400) -> Path:
    """A PNG of the page's first `height` pixels at `width`; fails loudly when no browser is installed."""
    browser = next((b for b in map(shutil.which, BROWSERS) if b), None)
    if browser is None:
        raise SystemExit(f"no browser found (tried {', '.join(BROWSERS)}); apt-get install -y chromium")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([
            browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", f"--screenshot={png}", f"--window-size={width},{height}",
            page.resolve().as_uri(),
        ], check=True, capture_output=True, timeout=120)
    return png


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store")
    parser.add_argument("--results", help="Results folder [default: the store's own <store>.results/].")
    parser.add_argument("--out-dir", default="/tmp/report-shot", type=Path)
    parser.add_argument("--height", type=int, default=2400)
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    summary = write_report(args.store, args.out_dir / "report.html", args.results)
    png = screenshot(Path(summary.out), args.out_dir / "report.png", height=args.height)
    print(f"report {summary.out} ({summary.results} results; {', '.join(summary.sections)}); screenshot {png}")


if __name__ == "__main__":
    main()
