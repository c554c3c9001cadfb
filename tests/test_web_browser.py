"""The dashboard in a real headless Chromium (Debian's ``chromium``, driven by Playwright with
``executable_path``): log in, see a failed backup's alert, acknowledge it and see ``pointsafe
status`` turn clean, browse into a point, download a file and a directory as tar.

Screenshots of the dashboard and of a task page are saved in $POINTSAFE_TEST_ARTIFACTS (or
the test's temporary directory) as web-dashboard.png and web-task.png."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from _tree_util import assert_trees_equal
from _web_util import PASSWORD, running, set_password
from conftest import run_cli

CHROMIUM = "/usr/bin/chromium"


def _skip_reason() -> str | None:
    if not os.path.exists(CHROMIUM):
        return f"Debian's chromium is not installed ({CHROMIUM} is missing: apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright; its own browser download is not needed)"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def test_browser_login_alert_ack_browse_download(safe_with_point, tmp_path):
    from playwright.sync_api import sync_playwright
    safe, pid, src = safe_with_point
    artifacts = Path(os.environ.get("POINTSAFE_TEST_ARTIFACTS") or tmp_path)
    artifacts.mkdir(parents=True, exist_ok=True)
    run_cli("config", "set", "quota.soft", "off", safe=safe, check=True)
    run_cli("config", "set", "quota.hard", "99.9%", safe=safe, check=True)
    assert run_cli("backup", src, "--name", "data", safe=safe).code == 1      # refused: a failed backup
    run_cli("config", "set", "quota.hard", "off", safe=safe, check=True)
    failed = json.loads(run_cli("tasks", "--state", "error", "--json", safe=safe).out)[0]["id"]
    set_password(safe)
    with running(safe) as server, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            ctx = browser.new_context(accept_downloads=True)
            page = ctx.new_page()
            problems: list[str] = []
            page.on("console", lambda m: problems.append(m.text)
                    if m.type == "error" and ("Content Security Policy" in m.text or "Uncaught" in m.text) else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.goto(server.url + "/")
            assert page.locator("#password").is_visible()
            page.fill("#password", PASSWORD)
            page.click("#login")
            page.wait_for_selector("#sources")
            alerts = page.locator("#alerts")
            assert f"backup task {failed} failed" in alerts.inner_text()
            page.screenshot(path=str(artifacts / "web-dashboard.png"), full_page=True)

            assert run_cli("status", safe=safe).code == 2
            while page.locator("button.ack").count():
                with page.expect_navigation():
                    page.locator("button.ack").first.click()
            assert page.locator("#state").inner_text() == "no open alerts"
            assert run_cli("status", safe=safe).code == 0

            page.goto(f"{server.url}/tasks/{failed}")
            assert "backup refused" in page.inner_text("#task")
            page.screenshot(path=str(artifacts / "web-task.png"), full_page=True)

            page.goto(f"{server.url}/points/{pid}")
            page.click("#browse")
            page.click("text=d/")
            page.wait_for_selector("#listing")
            with page.expect_download() as dl:
                page.click("a.download")
            got = tmp_path / "f.download"
            dl.value.save_as(got)
            assert dl.value.suggested_filename == "f"
            assert got.read_bytes() == (src / "d" / "f").read_bytes()

            page.goto(f"{server.url}/points/{pid}/tree/")
            with page.expect_download() as dl:
                page.click("text=download as .tar")
            tar = tmp_path / "all.tar"
            dl.value.save_as(tar)
            out = tmp_path / "out"
            out.mkdir()
            subprocess.run(["tar", "-xpf", str(tar), "-C", str(out)], check=True, timeout=120)
            assert_trees_equal(src, out / f"data-{pid[:12]}", check_atime=False, check_sparse=False)
            assert not problems, problems          # no CSP violation nor script error
        finally:
            browser.close()
