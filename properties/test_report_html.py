"""index.html opens from disk in a real browser (headless Chromium) with every chart loaded."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from properties.test_streaming import _lora_file
from verify import fixtures
from verify.cli import main

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PROBE = ("<script>window.addEventListener('load', () => { const imgs = [...document.images];"
         " document.body.dataset.images = imgs.length + ':' + imgs.filter(i => i.complete && i.naturalWidth > 0)"
         ".length; });</script>")


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (Debian package 'chromium'); .ci/run installs it")
def test_every_chart_loads_in_headless_chromium(tmp_path):
    _lora_file(tmp_path, fixtures.model_config("tiny"))
    out = tmp_path / "report"
    assert main(["report", "--lora", str(tmp_path / "lora.safetensors"), "--dtypes", "fp64,fp32,bf16",
                 "--out", str(out)]) == 0
    page = out / "probe.html"
    page.write_text((out / "index.html").read_text().replace("</body>", PROBE + "</body>"))
    dom = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000",
                          "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    found = re.search(r'data-images="(\d+):(\d+)"', dom)
    assert found, "the page did not finish loading in Chromium"
    total, loaded = map(int, found.groups())
    charts = {p.name for p in out.glob("*.png")}
    assert total == len(charts) == 4, (total, charts)
    assert loaded == total, f"{total - loaded} of {total} charts did not load"
