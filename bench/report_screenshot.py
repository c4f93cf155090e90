"""Render a store's HTML report and take screenshots of it in headless Chromium, to look at the page
as a reader will (not part of the tests: it needs a browser; `apt-get install -y chromium`).

    python bench/report_screenshot.py demo-output/store.zarr --out-dir /tmp/report-shot \
        [--docs docs/screenshots/report-demo.png]

Writes into --out-dir: report.html, report-full.png (the whole page: its height is measured first
in the same browser), and report-page-1.png, report-page-2.png, ... (the full shot cut into pieces
of --page-height pixels, small enough to read in an image viewer). --docs also writes a copy of the
full shot under --max-bytes for the documentation (full colour when it fits, else 256 colours,
scaled down until it fits).

Chromium runs with networking features off and a throw-away profile, so a page that asked for
anything outside itself would show it as a broken image rather than quietly fetch it.
"""

from __future__ import annotations

import argparse
import io
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from PIL import Image

from pipelines.report.html import write_report

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
MAX_HEIGHT = 16_000  # Chromium's largest screenshot is about 16k pixels high


def browser() -> str:
    found = next((b for b in map(shutil.which, BROWSERS) if b), None)
    if found is None:
        raise SystemExit(f"no browser found (tried {', '.join(BROWSERS)}); apt-get install -y chromium")
    return found


def chromium(*args: str) -> str:
    """Run headless Chromium offline with a throw-away profile; its stdout."""
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run([
            browser(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--hide-scrollbars", f"--user-data-dir={profile}", *args,
        ], check=True, capture_output=True, text=True, timeout=180)
    return done.stdout


def page_height(page: Path, width: int) -> int:
    """The page's full height in CSS pixels at `width`, measured by a copy of it whose script puts
    the height into the title, read back from the DOM Chromium dumps."""
    probe = page.with_name(page.stem + "-height.html")
    script = "<script>document.title = 'height=' + document.documentElement.scrollHeight;</script>"
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", script + "</body>"), encoding="utf-8")
    try:
        dom = chromium(f"--window-size={width},1000", "--virtual-time-budget=2000", "--dump-dom", probe.resolve().as_uri())
    finally:
        probe.unlink()
    found = re.search(r"<title>height=(\d+)</title>", dom)
    if found is None:
        raise SystemExit("could not measure the page height")
    return int(found.group(1))


def screenshot(page: Path, png: Path, width: int = 1280, height: int | None = None) -> Path:
    """A PNG of the page at `width`: its first `height` pixels, or the whole page when None."""
    height = min(height or page_height(page, width), MAX_HEIGHT)
    chromium(f"--screenshot={png}", f"--window-size={width},{height}", "--virtual-time-budget=2000",
             page.resolve().as_uri())
    return png


def pages(png: Path, page_height_px: int) -> list[Path]:
    """Cut a tall screenshot into pieces of `page_height_px` rows: `<stem>-page-<i>.png`."""
    image = Image.open(png)
    out = []
    for i, top in enumerate(range(0, image.height, page_height_px), start=1):
        piece = png.with_name(f"{png.stem.removesuffix('-full')}-page-{i}.png")
        image.crop((0, top, image.width, min(top + page_height_px, image.height))).save(piece)
        out.append(piece)
    return out


def compact(png: Path, out: Path, max_bytes: int) -> Path:
    """A copy of `png` under `max_bytes`: full colour if it fits, else 256 colours (which bands the
    colour bars), scaled down in steps of 10% until one of them fits."""
    image = Image.open(png).convert("RGB")
    scale = 1.0
    while True:
        small = image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS) \
            if scale < 1 else image
        for candidate in (small, small.quantize(256, method=Image.Quantize.MEDIANCUT)):
            buffer = io.BytesIO()
            candidate.save(buffer, format="PNG", optimize=True)
            if buffer.tell() <= max_bytes or scale < 0.3:
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(buffer.getvalue())
                return out
        scale *= 0.9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store")
    parser.add_argument("--results", help="Results folder [default: the store's own <store>.results/].")
    parser.add_argument("--out-dir", default="/tmp/report-shot", type=Path)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--page-height", type=int, default=1600, help="Rows per page of the cut screenshots.")
    parser.add_argument("--t-axis", default="log")
    parser.add_argument("--docs", type=Path, help="Also write a compact copy of the full screenshot here.")
    parser.add_argument("--max-bytes", type=int, default=1_000_000)
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    summary = write_report(args.store, args.out_dir / "report.html", args.results, args.t_axis)
    full = screenshot(Path(summary.out), args.out_dir / "report-full.png", args.width)
    cut = pages(full, args.page_height)
    print(f"report {summary.out} ({summary.results} results; {', '.join(summary.sections)}); "
          f"screenshot {full} ({Image.open(full).height} px high), pages {', '.join(map(str, cut))}")
    if args.docs:
        small = compact(full, args.docs, args.max_bytes)
        print(f"compact copy {small} ({small.stat().st_size / 1e6:.2f} MB, {Image.open(small).size[0]} px wide)")


if __name__ == "__main__":
    main()
