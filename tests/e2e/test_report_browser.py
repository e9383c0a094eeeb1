"""The HTML report in a real browser: headless Chromium (Debian package `chromium`).

No browser driver, no extra Python package: Chromium runs with `--dump-dom` (the DOM after the
page's scripts ran) and `--screenshot`. JS errors are caught two ways:
  * the report installs a `window` "error" handler in <head> that writes every uncaught error
    into `<div id="js-errors">`, and its main script sets `<body data-ready="1">` when it has
    initialised: the dumped DOM must have the marker and an empty #js-errors;
  * Chromium's stderr (`--enable-logging=stderr`) has one `:CONSOLE...] "message", source: URL`
    line per console message; there must be none whose source is the report (it logs nothing).
A broken copy of the page proves both detectors fire, and a probe copy (the report plus a test
script that uses the controls) proves the filter, toggles and alert links work; other probes hover
and click grid cells (on the small run and on a generated 64-prompt x 200-event history, whose
size and layout are checked), and use the page comparing two runs.
Locally the test skips when chromium is missing; with CI=true it fails instead.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from report_fixtures import build_small_run
from trainer.report import write_report

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--enable-logging=stderr", "--v=0",
]

PROBE = r"""
<script>
(function () {
  var r = {};
  function visible() {
    return Array.prototype.filter.call(document.querySelectorAll("details.timeline"), function (d) { return !d.hidden; }).length;
  }
  function openCount() { return document.querySelectorAll("details.timeline[open]").length; }
  function type(text) { var f = document.getElementById("prompt-filter"); f.value = text; f.dispatchEvent(new Event("input")); }
  r.total = document.querySelectorAll("details.timeline").length;
  r.openAtStart = openCount();
  type("__FILTER__");
  r.filtered = visible();
  r.filteredIds = Array.prototype.filter.call(document.querySelectorAll("details.timeline"), function (d) { return !d.hidden; })
    .map(function (d) { return d.getAttribute("data-prompt-id"); });
  r.countText = document.getElementById("visible-count").textContent;
  type("");
  r.unfiltered = visible();
  var only = document.getElementById("only-alerts");
  only.click(); r.onlyAlerts = visible(); only.click(); r.afterToggle = visible();
  document.getElementById("expand-all").click(); r.expanded = openCount();
  document.getElementById("collapse-all").click(); r.collapsed = openCount();
  // hide every timeline, then follow the first link of the alert list: it must come back open
  type("no prompt matches this");
  r.hiddenBeforeLink = visible();
  var link = document.querySelector("#alert-list a.alert-link");
  var id = link.getAttribute("href").slice(1);
  link.click();
  var row = document.getElementById(id), holder = row.closest("details");
  r.linkTarget = id;
  r.linkPrompt = holder && holder.getAttribute("data-prompt-id");
  r.linkOpened = !!(holder && holder.open && !holder.hidden);
  r.linkFlash = row.classList.contains("flash");
  r.filterCleared = document.getElementById("prompt-filter").value === "";
  // chart legend toggles its series
  var item = document.querySelector('#chart-loss-svg .legend-item[data-series="val/loss"]');
  item.dispatchEvent(new MouseEvent("click", {bubbles: true}));
  r.seriesHidden = document.querySelector('#chart-loss-svg g.series[data-series="val/loss"]').classList.contains("off");
  // the word-diff toggle
  document.getElementById("show-diff").click();
  r.noDiff = document.body.classList.contains("no-diff");
  var out = document.createElement("pre"); out.id = "probe-result"; out.textContent = JSON.stringify(r);
  document.body.appendChild(out);
})();
</script>
"""


def chromium_binary() -> str:
    path = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
    if path is None:
        message = "chromium not installed (Debian package 'chromium'); CI installs it"
        if os.environ.get("CI") == "true":
            pytest.fail(message + " — and CI must never skip this test")
        pytest.skip(message)
    return path


class Browser:
    def __init__(self, binary: str, tmp: Path):
        self.binary, self.tmp, self.runs = binary, tmp, 0

    def run(self, page: Path, *args: str, fragment: str = "") -> subprocess.CompletedProcess:
        self.runs += 1
        profile = self.tmp / f"profile-{self.runs}"
        cmd = [self.binary, *FLAGS, f"--user-data-dir={profile}", *args, page.resolve().as_uri() + fragment]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    def dump_dom(self, page: Path) -> tuple[str, list[str]]:
        proc = self.run(page, "--dump-dom")
        return proc.stdout, console_lines(proc.stderr, page)

    def screenshot(self, page: Path, png: Path, fragment: str = "", height: int = 2000) -> list[str]:
        proc = self.run(page, f"--screenshot={png}", f"--window-size=1280,{height}", "--hide-scrollbars", fragment=fragment)
        return console_lines(proc.stderr, page)


def console_lines(stderr: str, page: Path) -> list[str]:
    """Console messages (errors, uncaught exceptions, logs) whose source is `page`."""
    uri = page.resolve().as_uri()
    return [l for l in stderr.splitlines() if re.search(r":CONSOLE[(:]", l) and uri in l]


def js_errors(dom: str) -> str:
    m = re.search(r'<div id="js-errors"[^>]*>(.*?)</div>', dom, re.S)
    assert m, "no #js-errors element in the DOM"
    return m.group(1).strip()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    browser = Browser(chromium_binary(), tmp_path_factory.mktemp("chromium"))
    run = tmp_path_factory.mktemp("browser") / "run-browser"
    facts = build_small_run(run)
    report = write_report(run)
    return browser, run, facts, report


def test_report_renders_and_js_runs_without_errors(setup):
    browser, _, facts, report = setup
    dom, console = browser.dump_dom(report)
    assert console == [], "console messages from the report:\n" + "\n".join(console)
    assert re.search(r'<body[^>]*\bdata-ready="1"', dom), "the report's script did not finish initialising"
    assert js_errors(dom) == ""
    assert 'id="chart-loss-svg"' in dom and 'id="chart-rewards-svg"' in dom
    for series in ("train/loss", "val/loss", *facts["reward_series"]):
        assert f'data-series="{series}"' in dom
    found = re.findall(r'<details class="timeline[^"]*" id="prompt-\d+" data-prompt-id="([^"]+)"', dom)
    assert found == facts["prompt_ids"]
    # set by the script: "N of N prompts shown"
    n = len(facts["prompt_ids"])
    assert f'<span id="visible-count">{n} of {n} prompts shown</span>' in dom
    # the script tag in a generation stayed text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom


def test_controls_work(setup, tmp_path):
    browser, _, facts, report = setup
    html = report.read_text(encoding="utf-8")
    probe = tmp_path / "probe.html"
    probe.write_text(html.replace("</body>", PROBE.replace("__FILTER__", facts["filter_word"]) + "</body>"), encoding="utf-8")
    dom, console = browser.dump_dom(probe)
    assert console == [], "\n".join(console)
    assert js_errors(dom) == ""
    m = re.search(r'<pre id="probe-result">(.*?)</pre>', dom, re.S)
    assert m, "the probe script did not run"
    r = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    n = len(facts["prompt_ids"])
    with_alerts = len({pid for _, _, pid in facts["alerts"] if pid})
    assert r["total"] == n and r["openAtStart"] == 0
    assert r["filtered"] == 1 and r["filteredIds"] == ["pc3"] and r["countText"] == f"1 of {n} prompts shown"
    assert r["unfiltered"] == n
    assert r["onlyAlerts"] == with_alerts and r["afterToggle"] == n
    assert r["expanded"] == n and r["collapsed"] == 0
    assert r["hiddenBeforeLink"] == 0
    assert r["linkTarget"] == "alert-1" and r["linkPrompt"] == facts["alerts"][0][2]
    assert r["linkOpened"] and r["linkFlash"] and r["filterCleared"]
    assert r["seriesHidden"] and r["noDiff"]


def test_error_detection_catches_a_broken_page(setup, tmp_path):
    """The two detectors are not vacuous: an exception in the page shows up in both."""
    browser, _, _, report = setup
    broken = tmp_path / "broken.html"
    html = report.read_text(encoding="utf-8")
    broken.write_text(html.replace("</main>", "</main><script>reportProbeUndefinedFunction();</script>", 1), encoding="utf-8")
    dom, console = browser.dump_dom(broken)
    assert "reportProbeUndefinedFunction" in js_errors(dom)
    assert any("Uncaught" in l and "reportProbeUndefinedFunction" in l for l in console), console
    assert re.search(r'<body[^>]*\bdata-ready="1"', dom)  # later scripts still ran


def test_screenshot(setup, tmp_path_factory):
    browser, _, _, report = setup
    out = tmp_path_factory.mktemp("screenshots")
    started = time.perf_counter()
    top, alert = out / "report.png", out / "report-first-alert.png"
    assert browser.screenshot(report, top) == []
    # opens the prompt holding alert 1 (a window tall enough for the page, so nothing scrolls)
    assert browser.screenshot(report, alert, fragment="#alert-1", height=3000) == []
    for png in (top, alert):
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_size > 10_000, png.stat().st_size
        print(f"screenshot: {png} ({png.stat().st_size // 1024} kB)")
    print(f"screenshots took {time.perf_counter() - started:.1f} s")


# ---------------------------------------------------------------------------------- the grid
GRID_PROBE = r"""
<script>
(function () {
  var r = {};
  var grid = document.getElementById("grid"), tip = document.getElementById("grid-tip");
  var rows = grid.querySelectorAll(".grid-row[data-prompt-id]");
  r.eventRowCells = Array.prototype.map.call(grid.querySelectorAll(".grid-events a.c.al"), function (a) { return a.getAttribute("href"); });
  var ev = grid.querySelector(".grid-events a.c");
  if (ev) { ev.dispatchEvent(new MouseEvent("mouseover", {bubbles: true})); r.eventTip = tip.textContent; }
  r.rows = rows.length;
  r.cols = Number(grid.getAttribute("data-cols"));
  r.cellsPerRow = Array.prototype.map.call(rows, function (row) { return row.querySelectorAll(".c").length; });
  var box = grid.getBoundingClientRect();
  r.gridWidth = box.width; r.gridHeight = box.height; r.viewport = window.innerWidth;
  var cell = document.querySelector('#grid a.c[href="__CELL__"]');
  var cb = cell.getBoundingClientRect();
  r.cellWidth = cb.width; r.cellHeight = cb.height;
  cell.dispatchEvent(new MouseEvent("mouseover", {bubbles: true}));
  r.tipShown = !tip.hidden; r.tip = tip.textContent;
  grid.dispatchEvent(new MouseEvent("mouseleave"));
  r.tipHidden = tip.hidden;
  cell.click();
  var row = document.getElementById("__CELL__".slice(1)), holder = row.closest("details.timeline");
  r.opened = holder.open; r.openedPrompt = holder.getAttribute("data-prompt-id");
  r.flash = row.classList.contains("flash"); r.rowStep = row.getAttribute("data-step");
  var out = document.createElement("pre"); out.id = "probe-result"; out.textContent = JSON.stringify(r);
  document.body.appendChild(out);
})();
</script>
"""


def probe_result(dom: str) -> dict:
    m = re.search(r'<pre id="probe-result">(.*?)</pre>', dom, re.S)
    assert m, "the probe script did not run"
    return json.loads(m.group(1).replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&"))


def test_grid_hover_shows_the_generation_and_click_opens_the_timeline(setup, tmp_path):
    browser, _, facts, report = setup
    html = report.read_text(encoding="utf-8")
    # prompt pa1 (#1) at its third event (step 100): "The answer is 41 ..."; exact match 0 and an alert
    probe = tmp_path / "grid-probe.html"
    probe.write_text(html.replace("</body>", GRID_PROBE.replace("__CELL__", "#p1-e3") + "</body>"), encoding="utf-8")
    assert re.search(r'<a class="c em0 al" href="#p1-e3">', html)
    dom, console = browser.dump_dom(probe)
    assert console == [] and js_errors(dom) == ""
    r = probe_result(dom)
    assert r["rows"] == len(facts["prompt_ids"]) and r["cols"] == facts["sample_events"]
    assert r["cellsPerRow"] == [facts["sample_events"]] * len(facts["prompt_ids"])
    assert r["tipShown"] and r["tipHidden"]
    # the event-wide alert (collapse at step 150) has its cell in the row on top
    assert r["eventRowCells"] == ["#alert-3"] and "all prompts" in r["eventTip"] and "near-identical" in r["eventTip"]
    assert r["tip"].startswith("#1 · step 100 · validation") and "EM 0" in r["tip"]
    assert r["tip"].endswith("\nThe answer is 41 because six times seven")  # the text itself, not the diff's deleted words
    assert r["opened"] and r["openedPrompt"] == "pa1" and r["flash"] and r["rowStep"] == "100"



def test_rollback_page_hovers_a_discarded_cell_and_opens_its_row(tmp_path):
    """A run that rolled back and stopped: no JS error, the discarded event's cell shows its
    discarded generation with the label, and opens its greyed row."""
    from report_fixtures import build_rollback_run

    browser = Browser(chromium_binary(), tmp_path)
    facts = build_rollback_run(tmp_path / "rb")
    html = write_report(tmp_path / "rb").read_text(encoding="utf-8")
    probe = tmp_path / "rb-probe.html"  # prompt pa1 (#1), its third event: step 6 before the rollback
    probe.write_text(html.replace("</body>", GRID_PROBE.replace("__CELL__", "#p1-e3") + "</body>"), encoding="utf-8")
    dom, console = browser.dump_dom(probe)
    assert console == [] and js_errors(dom) == "" and re.search(r'<body[^>]*\bdata-ready="1"', dom)
    r = probe_result(dom)
    assert r["cols"] == facts["columns"] and r["tipShown"]
    assert r["tip"].startswith("#1 · step 6 · validation · discarded by the rollback at step 6")
    assert r["tip"].split("\n", 1)[1].strip() == facts["discarded"]["pa1"]  # its own text (the deleted "42" left out)
    assert r["opened"] and r["openedPrompt"] == "pa1" and r["flash"] and r["rowStep"] == "6"

GRID_SIZE_LIMIT_BYTES = 12_000_000  # 64 prompts x 200 events of 25 words, timelines included


def test_grid_of_64_prompts_by_200_events_stays_readable(tmp_path):
    from report_fixtures import build_grid_run

    browser = Browser(chromium_binary(), tmp_path)
    run = tmp_path / "grid-run"
    facts = build_grid_run(run, prompts=64, events=200)
    report = write_report(run)
    html = report.read_text(encoding="utf-8")
    size = report.stat().st_size
    print(f"64 x 200 report: {size / 1e6:.1f} MB")
    assert size < GRID_SIZE_LIMIT_BYTES
    assert not re.search(r'(src|href)="(https?:)?//', html)  # self-contained
    pid, event = facts["alert_cells"][0]
    cell = f"#p{int(pid[1:]) + 1}-e{event}"
    assert f'<a class="c em0 al" href="{cell}">' in html or re.search(rf'<a class="c [a-z0-9]+ al" href="{cell}">', html)
    probe = tmp_path / "grid-probe.html"
    probe.write_text(html.replace("</body>", GRID_PROBE.replace("__CELL__", cell) + "</body>"), encoding="utf-8")
    proc = browser.run(probe, "--dump-dom", "--window-size=1280,1000")
    dom = proc.stdout
    assert console_lines(proc.stderr, probe) == [] and js_errors(dom) == ""
    r = probe_result(dom)
    assert (r["rows"], r["cols"]) == (64, 200) and r["cellsPerRow"] == [200] * 64
    # readable: every column inside the page's width, every row a visible strip, the whole grid
    # one screen high
    assert r["gridWidth"] <= r["viewport"] and r["cellWidth"] >= 3 and r["cellHeight"] >= 10
    assert r["gridHeight"] < 1000, r["gridHeight"]
    assert r["tipShown"] and r["tip"].startswith(f"#{int(pid[1:]) + 1} · step {event * 10} · validation")
    assert r["opened"] and r["openedPrompt"] == pid and r["flash"]
    # the cell colours follow the rule: a prompt with a reference turns green when it learns it
    learned = facts["learned_at"][0]
    row = re.search(r'<div class="grid-row" data-prompt-id="g00">(.*?)</div>', html).group(1)
    classes = re.findall(r'class="c (em\d)', row)
    assert classes == ["em0"] * learned + ["em1"] * (200 - learned)


# ---------------------------------------------------------------------------- runs compared
COMPARE_PROBE = r"""
<script>
(function () {
  var r = {};
  function visible() {
    return Array.prototype.filter.call(document.querySelectorAll("details.cmp-prompt"), function (d) { return !d.hidden; }).length;
  }
  r.total = document.querySelectorAll("details.cmp-prompt").length;
  r.warnings = Array.prototype.map.call(document.querySelectorAll("#warnings .warning"), function (p) { return p.textContent; });
  var only = document.getElementById("only-disagree");
  only.click(); r.onlyDisagree = visible(); only.click();
  var f = document.getElementById("prompt-filter"); f.value = "no prompt matches"; f.dispatchEvent(new Event("input"));
  r.hiddenBeforeLink = visible();
  var link = document.querySelector("#disagree-table a");
  var id = link.getAttribute("href").slice(1);
  link.click();
  var row = document.getElementById(id), holder = row.closest("details.cmp-prompt");
  r.linkPrompt = holder.getAttribute("data-prompt-id"); r.linkOpened = holder.open && !holder.hidden;
  r.rowDisagrees = row.classList.contains("disagree"); r.flash = row.classList.contains("flash");
  r.ins = row.querySelectorAll("ins").length;
  var out = document.createElement("pre"); out.id = "probe-result"; out.textContent = JSON.stringify(r);
  document.body.appendChild(out);
})();
</script>
"""


def test_comparison_page_in_the_browser(setup, tmp_path):
    from trainer.report import write_compare

    browser, run, facts, _ = setup
    other = tmp_path / "run-other"
    shutil.copytree(run, other)
    lines = (other / "samples.jsonl").read_bytes().split(b"\n")
    changed = []
    for line in lines[:-1]:  # the torn last line stays as it is
        record = json.loads(line)
        if record.get("kind") == "sample" and record["prompt_id"] == "pb2" and record["step"] >= 150:
            record["generation"] = "un chat et un chien"
        if record.get("kind") == "sample" and record["prefix"] == "samples":
            record["settings"] = {**record["settings"], "temperature": 1.3}
        changed.append(json.dumps(record).encode())
    (other / "samples.jsonl").write_bytes(b"\n".join(changed + [lines[-1]]))
    page = write_compare([run, other], tmp_path / "compare.html")
    probe = tmp_path / "compare-probe.html"
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", COMPARE_PROBE + "</body>"), encoding="utf-8")
    dom, console = browser.dump_dom(probe)
    assert console == [] and js_errors(dom) == "" and re.search(r'<body[^>]*\bdata-ready="1"', dom)
    r = probe_result(dom)
    assert r["total"] == len(facts["prompt_ids"]) and r["onlyDisagree"] == 1 and r["hiddenBeforeLink"] == 0
    assert len(r["warnings"]) == 1 and "sampling settings differ for samples samples" in r["warnings"][0]
    assert r["linkPrompt"] == "pb2" and r["linkOpened"] and r["rowDisagrees"] and r["flash"] and r["ins"] >= 1
