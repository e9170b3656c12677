"""docs/web.png: the web page after a compare run (mar, marche, turbo) with the digits model.

Starts the app under uvicorn on a loopback port (CPU, the shipped model, warmed up), drives
Debian's Chromium headless through Selenium (driver and browser by path: Selenium Manager is
never asked, nothing is downloaded), types a class name, presses Compare, waits for the three
images and saves the window, reduced to a 256-colour PNG to stay small.

    make screenshot            # or: .venv/bin/python scripts/screenshot.py --out docs/web.png
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import uvicorn
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service as ChromeService
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from service.http.app import build_app
from service.settings import ServiceSettings

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
MAX_BYTES = 300_000


def start_server() -> tuple[str, uvicorn.Server, threading.Thread]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = build_app(ServiceSettings(device="cpu", api_key=None))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:  # ready = model loaded and warmed up, so the timings are steady ones
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not get ready"
        try:
            if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                return url, server, thread
        except httpx.HTTPError:
            pass
        time.sleep(0.3)


def browser(width: int, height: int, profile: str) -> webdriver.Chrome:
    os.environ["SE_MANAGER_PATH"] = "/bin/false"  # never Selenium Manager (no network)
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}", "--hide-scrollbars", "--no-first-run",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--force-device-scale-factor=1",
                "--blink-settings=preferredColorScheme=1",  # light
                f"--user-data-dir={profile}"):  # fmt: skip
        opts.add_argument(arg)
    return webdriver.Chrome(options=opts, service=ChromeService(executable_path=DRIVER))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/web.png"))
    parser.add_argument("--class-name", default="seven", help="what is typed in the class box")
    parser.add_argument("--seed", type=int, default=4)
    parser.add_argument("--steps", type=int, default=None, help="default: the model's")
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=900)
    args = parser.parse_args()
    missing = [p for p in (CHROMIUM, DRIVER) if not os.access(p, os.X_OK)]
    if missing:
        sys.stderr.write(f"needs {' and '.join(missing)} (apt: chromium chromium-driver)\n")
        return 1

    url, server, thread = start_server()
    with tempfile.TemporaryDirectory() as profile:
        drv = browser(args.width, args.height, profile)
        try:
            drv.get(url + "/")
            WebDriverWait(drv, 30).until(
                lambda d: d.execute_script("return document.body.dataset.ready") == "true"
            )
            fields = {"class-name": args.class_name, "seed": str(args.seed)}
            if args.steps is not None:
                fields["steps"] = str(args.steps)
            for name, value in fields.items():
                box = drv.find_element(By.ID, name)
                box.clear()
                box.send_keys(value)
            drv.find_element(By.ID, "compare").click()
            WebDriverWait(drv, 300).until(
                lambda d: len(d.find_elements(By.CSS_SELECTOR, "#result .card img.final")) == 3
            )
            drv.execute_script("document.activeElement.blur(); window.scrollTo(0, 0)")
            time.sleep(0.3)  # the last image's layout
            png = drv.get_screenshot_as_png()
            status = drv.find_element(By.ID, "status").text
        finally:
            drv.quit()
            server.should_exit = True
            thread.join(30)

    image = Image.open(io.BytesIO(png)).convert("RGB").quantize(256)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    image.save(args.out, optimize=True)
    size = args.out.stat().st_size
    sys.stdout.write(f"{args.out}: {image.width}x{image.height}, {size // 1000} kB; {status}\n")
    if size > MAX_BYTES:
        sys.stderr.write(f"{args.out} is over {MAX_BYTES // 1000} kB\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
