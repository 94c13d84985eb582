"""The status page in a real browser: headless Chromium (the system's `chromium`, driven by Playwright)
against one real server on the synthetic source, with an API key, a trainer reading from it, running
statistics and a store that fills its byte budget; and a cluster directory in front of it.

The whole module skips only when no Chromium exists on the machine. `ACTDATA_SCREENSHOT=docs/status.png`
(a path relative to the repository) makes the test of the numbers save the page there; without it nothing
is written into the checkout.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import threading
import time

import pytest
import requests
from conftest import SYNTHETIC, private_tmpfs

from actdata.reading.client import ActivationClient
from actdata.serving.process import ServerProcess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = os.environ.get("ACTDATA_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
if not CHROMIUM:
    pytest.skip("no Chromium on this machine (scripts/setup.sh installs Debian's `chromium` when run as root)",
                allow_module_level=True)

from playwright.sync_api import sync_playwright  # noqa: E402 - only once Chromium is known to exist

KEY = "page-s3cret"
AUTH = {"Authorization": f"Bearer {KEY}"}
KEY_SCRIPT = f"sessionStorage.setItem('actdata.api_key', {KEY!r})"  # a tab that already entered the key


def _wait(what: str, fn, timeout: float = 60.0, every: float = 0.1, page=None):
    """Until fn() is true; with a page, waiting lets Playwright deliver the page's events meanwhile."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = fn()
        if v:
            return v
        page.wait_for_timeout(every * 1000) if page is not None else time.sleep(every)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    store = tmp_path_factory.mktemp("page-store")
    srv = ServerProcess([*SYNTHETIC, "buffer.prefix=actdata-t21page", "buffer.size=4000", "buffer.min_fill=0.25",
                         "generator.rows_per_second=3000", "generator.statistics=true", f"server.api_key={KEY}",
                         "store.write=true", f"store.path={store}", "store.shard_rows=1000",
                         "store.max_bytes=16000000"])
    stop = threading.Event()

    def trainer():  # rows going out, so both curves move
        with ActivationClient(srv.url, api_key=KEY) as c:
            c.wait_for_data(1000, timeout=60)
            while not stop.wait(0.1):
                try:
                    c.get_activations_tensor(256)
                except Exception:  # noqa: BLE001 - a restart or a drained buffer: go on reading
                    pass

    t = threading.Thread(target=trainer, daemon=True)
    t.start()
    yield srv
    stop.set()
    t.join(10)
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


class Tab:
    """A page in a fresh context (its own sessionStorage) that records console errors and the URLs it asks for."""

    def __init__(self, browser, url: str, width: int = 1280, height: int = 800, with_key: bool = True):
        self.context = browser.new_context(viewport={"width": width, "height": height})
        if with_key:
            self.context.add_init_script(KEY_SCRIPT)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.goto(url + "/")

    def text(self, selector: str) -> str:
        return self.page.locator(selector).first.inner_text()

    def number(self, selector: str) -> int:
        return int(re.sub(r"[^0-9]", "", self.text(selector)) or -1)

    def ticks(self) -> int:
        return int(self.page.locator("#updated").get_attribute("data-tick") or 0)

    def close(self):
        self.context.close()


@pytest.fixture
def tab(browser):
    opened = []

    def open_tab(url, **kw):
        t = Tab(browser, url, **kw)
        opened.append(t)
        return t

    yield open_tab
    for t in opened:
        t.close()


def test_json_callers_keep_the_json_and_a_browser_gets_one_self_contained_page(server):
    for accept in (None, "*/*", "application/json"):
        r = requests.get(server.url + "/", headers={"Accept": accept} if accept else {})
        assert r.headers["content-type"] == "application/json" and r.json()["status"] in ("ok", "filling")
    r = requests.get(server.url + "/", headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", r.text)  # nothing fetched from elsewhere
    assert "connect-src 'self'" in r.headers["content-security-policy"]
    h = requests.get(server.url + "/stats/history", headers=AUTH).json()
    assert h["columns"] == ["t", "rows_in_per_s", "rows_out_per_s", "fill"]
    assert requests.get(server.url + "/stats/history").status_code == 401  # like every route but GET /
    assert requests.get(server.url + "/stats/history?since=x", headers=AUTH).status_code == 422


def test_the_key_is_asked_once_a_wrong_one_is_refused_and_it_never_goes_into_a_url(server, tab):
    t = tab(server.url, with_key=False)
    page = t.page
    page.wait_for_selector("#key-panel", state="visible", timeout=20_000)
    # without the key: the public health only (states, fill), no rates, no error texts
    page.wait_for_selector("#gens tr[data-gen] .state", timeout=20_000)
    assert page.locator("#rates-card").is_hidden() and page.locator("#server-card").is_hidden()
    assert t.number("#capacity") == 4000
    page.fill("#key-input", "not-the-key")
    page.click("#key-submit")
    page.wait_for_selector("#key-error:has-text('Wrong API key')", timeout=20_000)
    tick = t.ticks()
    _wait("two more polls", lambda: t.ticks() >= tick + 2, timeout=20, page=page)
    assert "Wrong API key" in t.text("#key-error")  # said until another key is entered
    assert page.locator("#rates-card").is_hidden()
    page.fill("#key-input", KEY)
    page.click("#key-submit")
    page.wait_for_selector("#rates-card", state="visible", timeout=20_000)
    page.wait_for_selector("#key-panel", state="hidden")
    assert page.evaluate("sessionStorage.getItem('actdata.api_key')") == KEY
    n = len(t.requests)
    _wait("two more polls", lambda: len(t.requests) > n + 4, timeout=20, page=page)
    assert not any(KEY in u for u in t.requests) and KEY not in page.url
    assert not [e for e in t.errors if "401" not in e]  # the refused key's 401s are the only errors


def test_numbers_match_the_stats_and_the_chart_gains_points(server, tab):
    t = tab(server.url)
    page = t.page
    page.wait_for_selector("#rows-written", timeout=30_000)
    _wait("the buffer to serve", lambda: requests.get(server.url + "/", headers=AUTH).json()["serving"], 60)
    samples = []  # (time, /stats) every 0.1 s
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            samples.append((time.time(), requests.get(server.url + "/stats", headers=AUTH).json()))
            stop.wait(0.1)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        points0 = int(page.locator("#chart").get_attribute("data-points"))
        seen = []
        for _ in range(4):
            tick = t.ticks()
            _wait("a poll", lambda: t.ticks() > tick, timeout=10, page=page)
            seen.append((time.time(), t.number("#rows-written"), t.number("#rows-read"), t.number("#capacity"),
                         float(page.locator("#rate-in").get_attribute("data-v"))))
            page.wait_for_timeout(300)
        page.wait_for_timeout(1000)
    finally:
        stop.set()
        poller.join()
    # what the page shows is what /stats said within its last poll (a second, plus the request on a busy machine)
    for at, written, read, capacity, rate_in in seen:
        near = [s for ts, s in samples if at - 2.0 <= ts <= at + 0.1]
        assert near and capacity == near[0]["capacity"] == 4000
        assert min(s["rows_written"] for s in near) <= written <= max(s["rows_written"] for s in near)
        assert min(s["rows_read"] for s in near) <= read <= max(s["rows_read"] for s in near)
        assert 0.8 * min(s["writes_per_s"] for s in near) <= rate_in <= 1.2 * max(s["writes_per_s"] for s in near)
    _wait("the chart to gain points",
          lambda: int(page.locator("#chart").get_attribute("data-points")) >= points0 + 2, timeout=15, page=page)
    assert page.locator("#line-in").get_attribute("points").count(",") >= 2
    # what else the page shows: the generator, the store, the statistics, the HTTP processes
    row = page.locator("#gens tr[data-gen]").first
    assert row.locator(".state").get_attribute("data-state") == "running"
    assert "rows/s" in t.text("#rate-out") and "MB/s" in t.text("#mb-out")
    page.wait_for_selector("#store-card", state="visible", timeout=20_000)
    page.wait_for_selector("#statistics tbody tr", timeout=20_000)
    assert t.text("#http-alive") == "2"
    assert t.errors == []
    shot = os.environ.get("ACTDATA_SCREENSHOT")
    if shot:
        page.screenshot(path=os.path.join(ROOT, shot), full_page=True)


def test_consumer_groups_show_when_the_stats_list_them(server, tab):
    """A server whose /stats has a "groups" list (the consumer groups): the real answer, with groups added
    on its way to the page; without the list the section stays hidden."""
    t = tab(server.url)
    page = t.page
    page.wait_for_selector("#gens tr[data-gen]", timeout=30_000)
    assert page.locator("#groups-card").is_hidden()
    now = time.time()
    groups = [{"name": "sae-a", "state": "active", "rows_read": 120000, "lag": 1500, "rows_per_s": 2400.0,
               "rows_skipped": 0, "last_seen": now - 1, "registered": now - 200},
              {"name": "sae-<b>", "state": "idle", "rows_read": 5, "lag": 3990, "rows_per_s": 0.0,
               "rows_skipped": 12, "last_seen": now - 190, "registered": now - 400}]

    def with_groups(route):
        r = route.fetch()
        route.fulfill(response=r, json={**r.json(), "groups": groups})

    page.route(re.compile(r".*/stats$"), with_groups)
    page.wait_for_selector("#groups-card", state="visible", timeout=10_000)
    rows = page.locator("#groups tbody tr")
    assert rows.count() == 2
    assert rows.nth(0).locator(".lag").inner_text() == "1,500"
    assert "sae-<b>" in rows.nth(1).inner_text() and "3 min ago" in rows.nth(1).inner_text()  # escaped, as text
    assert t.errors == []


@pytest.mark.parametrize("width,height", [(1280, 800), (390, 844)])
def test_usable_at_desktop_and_phone_width(server, tab, width, height):
    t = tab(server.url, width=width, height=height)
    page = t.page
    page.wait_for_selector("#gens tr[data-gen]", timeout=30_000)
    page.wait_for_selector("#rates-card", state="visible")
    assert page.evaluate("document.documentElement.scrollWidth") <= width  # no sideways scrolling of the page
    for sel in ("#fill-pct", "#chart", "#gens-card", "#server-card", "#status"):  # wide tables scroll in their card
        box = page.locator(sel).bounding_box()
        assert box and box["width"] > 0 and box["x"] >= 0 and box["x"] + box["width"] <= width + 1, (sel, box)
    assert t.errors == []


def test_a_cluster_directory_lists_its_nodes_and_a_click_opens_one(server, tab):
    from actdata.cluster.directory import Directory

    d = Directory(api_key=KEY, poll_interval_s=0.2, drop_after_s=1.0)
    url = d.start()
    try:
        d.set_member("node-a", server.url, node_rank=0, node_ip="127.0.0.1")
        d.set_member("node-b", "http://127.0.0.1:9", node_rank=1)  # nothing answers there: a down node
        d.set_problem("node-c", "no CPU for a server on this node")
        assert requests.get(url + "/").headers["content-type"] == "application/json"
        t = tab(url)
        page = t.page
        page.wait_for_selector("#nodes tr.node", timeout=20_000)
        assert page.locator("#nodes tr.node").count() == 1
        row = page.locator("#nodes tr.node").first
        assert row.locator(".health").inner_text() in ("ok", "filling", "degraded")
        problems = t.text("#problems")
        assert "no CPU for a server" in problems and "127.0.0.1:9" in problems
        assert "4,000" in t.text("#total-ready") and t.text("#live-nodes").startswith("1 of")
        with t.context.expect_page() as opened:
            row.locator("td").first.click()
        node = opened.value
        node.wait_for_selector("#gens tr[data-gen]", timeout=20_000)  # the node's own page
        assert node.url.rstrip("/") == server.url and node.title() == "actdata"
        assert t.errors == []
    finally:
        d.stop()


def test_a_killed_generator_shows_restarting_then_running(server, tab):
    t = tab(server.url)
    page = t.page
    page.wait_for_selector("#gens tr[data-gen] .state[data-state=running]", timeout=30_000)
    (gen,) = requests.get(server.url + "/stats", headers=AUTH).json()["generators"]
    restarts = gen["restarts"]
    os.kill(gen["pid"], signal.SIGKILL)
    page.wait_for_selector("#gens .state[data-state=restarting]", timeout=30_000)
    page.wait_for_selector("#gens .state[data-state=running]", timeout=90_000)
    assert t.number("#gens .restarts") == restarts + 1
    assert "SIGKILL" in t.text("#gens .err")  # the cause, for a caller with the key
    assert t.errors == []


@pytest.fixture
def small_tmpfs():
    with private_tmpfs("8m") as d:
        yield d
    os.rmdir(d)


def test_a_generator_paused_on_a_full_disk_shows_as_paused_with_the_reason(small_tmpfs, tab):
    srv = ServerProcess([*SYNTHETIC, "buffer.prefix=actdata-t21full", f"buffer.path={small_tmpfs}",
                         "buffer.reserve=false", "buffer.size=2000", "buffer.min_fill=0.1", "server.workers=1",
                         "generator.rows_per_second=300"])
    try:  # 2,000 rows of 3 KB do not fit beside the filler once it has taken the rest of the 8 MB
        _wait("a few rows", lambda: requests.get(srv.url + "/stats").json()["ready"] >= 300, 60)
        fd = os.open(os.path.join(small_tmpfs, "filler"), os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"\0" * 65536)
        except OSError:
            pass
        finally:
            os.close(fd)
        for _ in range(100):  # the status is rewritten in place now: /stats must list the generator every time
            gens = requests.get(srv.url + "/stats").json()["generators"]
            assert len(gens) == 1, gens
            if gens[0]["state"] == "paused":
                break
            time.sleep(0.2)
        assert gens[0]["state"] == "paused" and "space" in gens[0]["last_error"]
        for _ in range(30):
            assert len(requests.get(srv.url + "/stats").json()["generators"]) == 1
        t = tab(srv.url, with_key=False)
        t.page.wait_for_selector("#gens .state[data-state=paused]", timeout=20_000)
        assert "space" in t.text("#gens .err") and "paused" in t.text("#gens .err")
        assert t.errors == []
    finally:
        srv.stop()
