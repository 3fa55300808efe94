"""Take the playground picture in docs (docs/img/playground.png): `pasta serve` on the bundled model, the page in
headless Chromium, one prompt side by side with sequential decoding, a screenshot while PASTA's async blocks are
filling in (at least two live), and one at the end. Needs Chromium, chromedriver and selenium (`pip install -e
'.[browser]'`; `apt-get install chromium chromium-driver`).

    .venv/bin/python scripts/screenshot_playground.py [--prompt TEXT] [--out docs/img] [-- serve options]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt", default="Give three tips to sleep better.")
    ap.add_argument("--out", default="docs/img")
    ap.add_argument("--min-live", type=int, default=2, help="blocks live at once for the mid-stream picture")
    ap.add_argument("serve", nargs="*", help="options for `pasta serve`, after --")
    a = ap.parse_args()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    port = free_port()
    pasta = Path(sys.executable).with_name("pasta")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([str(pasta), "serve", "--port", str(port), *a.serve], env=env)
    url = f"http://127.0.0.1:{port}"
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    print("pasta serve did not start", file=sys.stderr)
                    return 1
                time.sleep(0.5)
        opts = webdriver.ChromeOptions()
        opts.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--window-size=1400,900", "--hide-scrollbars"):
            opts.add_argument(arg)
        b = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
        try:
            b.get(url + "/")
            WebDriverWait(b, 60).until(lambda d: d.execute_script(
                "return document.querySelector('#model').textContent.startsWith('model: ')"))
            box = b.find_element(By.ID, "prompt")
            box.clear()
            box.send_keys(a.prompt)
            b.find_element(By.ID, "run").click()
            shot_mid = None
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                r = b.execute_script("return window.pasta.runs")
                p = r.get("pasta") or {}
                live = b.execute_script("return document.querySelectorAll('#pane-pasta .block[data-live=\"1\"]')"
                                        ".length")
                if shot_mid is None and live >= a.min_live:
                    shot_mid = out / "playground.png"
                    b.save_screenshot(str(shot_mid))
                    print(f"mid-stream: {live} blocks live -> {shot_mid}")
                if p.get("done") and (r.get("sequential") or {}).get("done"):
                    break
                time.sleep(0.1)
            b.save_screenshot(str(out / "playground-done.png"))
            r = b.execute_script("return window.pasta.runs")
            for mode in ("pasta", "sequential"):
                f = (r.get(mode) or {}).get("figures") or {}
                print(mode, {k: f.get(k) for k in ("tokens", "tag_tokens", "decode_steps", "threads",
                                                   "theoretical_speedup", "wall_s")})
                print("  " + (r.get(mode) or {}).get("text", "").replace("\n", "\n  "))
            if shot_mid is None:
                print(f"no moment with {a.min_live} blocks live: no mid-stream picture", file=sys.stderr)
                return 1
        finally:
            b.quit()
    finally:
        proc.terminate()
        proc.wait(30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
