"""`fedbench report`: the page's tables against the leaderboard CSV, a folder that holds only CSVs, a
URI, escaping; then the page in headless Chromium (Debian's `chromium`; skipped where it is missing):
it renders, a click on a column header sorts, the filter box filters, the dark scheme applies, it
prints, and a `<script>` label stays text."""
import base64
import io
import json
import os
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
from test_leaderboard import METHODS, write_runs

from harness.cli import main

EVIL = "<script>window.pwned = 1</script>"  # a method title that must stay text


class Page(HTMLParser):
    """The parts of the page the tests read: every table (class, header, rows of (attributes, cells
    with their data-v)), the start tags seen, the text."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tables, self.tags, self.text = [], [], []
        self._row = self._cell = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag == "table":
            self.tables.append({"class": attrs.get("class", ""), "header": [], "rows": []})
        elif tag == "tr" and self.tables:
            self._row = {"attrs": attrs, "cells": []}
        elif tag in ("td", "th") and self._row is not None:
            self._cell = {"v": attrs.get("data-v"), "text": "", "th": tag == "th"}

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._cell["text"] = self._cell["text"].strip()
            self._row["cells"].append(self._cell)
            self._cell = None
        elif tag == "tr" and self._row is not None:
            table = self.tables[-1]
            if all(c["th"] for c in self._row["cells"]) and not table["header"]:
                table["header"] = [c["text"] for c in self._row["cells"]]
            else:
                table["rows"].append(self._row)
            self._row = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell["text"] += data

    def table(self, css: str) -> dict:
        (found,) = [t for t in self.tables if css in t["class"].split()]
        return found


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Three seeds of four methods (test_leaderboard's runs), one of them titled with a script tag,
    with its leaderboard against `base`, its claims for `up` and its report saved beside them."""
    tmp_path = tmp_path_factory.mktemp("results")
    methods = dict(METHODS, same=(EVIL,) + METHODS["same"][1:])
    write_runs(tmp_path, methods)
    for path in tmp_path.glob("*/rounds.parquet"):  # the spread over clients; the 10th percentile on
        rounds = pd.read_parquet(path)              # the mirrored test sets only
        rounds["acc_clients_std"] = rounds["acc_clients_std_authors_tests"] = 0.04
        rounds["acc_clients_p10"] = rounds["acc_clients_mean"] - 0.06
        rounds.to_parquet(path)
    (tmp_path / "s_base_seed1" / "config.yaml").write_text("name: s_base_seed1\nnote: <b>bold</b>\n")
    assert main(["leaderboard", str(tmp_path), "--baseline", "base", "--claims", "up"]) == 0
    assert main(["report", str(tmp_path)]) == 0
    return tmp_path


def test_the_tables_equal_the_leaderboard_csv(results):
    text = (results / "report.html").read_text()
    page = Page(text)
    csv = pd.read_csv(results / "leaderboard.csv").set_index("method")
    board = page.table("board")
    assert len(board["rows"]) == len(csv) == 4  # one row per method variant
    assert board["header"][:5] == ["#", "method", "seeds", "last-10 acc %, authors' tests, client models",
                                   "authors' tests, global model"]  # the paper's protocol first
    column = {name: i for i, name in enumerate(board["header"])}
    for row in board["rows"]:
        method = row["attrs"]["data-method"]
        want = csv.loc[method]
        cells = row["cells"]
        assert cells[column["method"]]["text"].startswith(want["method_title"])
        for name, stem, suffix in (("mirrored, client models", "last10_acc", ""),
                                   ("authors' tests, global model", "last10_acc_global", "_authors_tests")):
            mean, low, high = (want[f"{stem}_{s}{suffix}"] for s in ("mean", "ci95_low", "ci95_high"))
            assert cells[column[name]]["text"] == f"{100 * mean:.2f} [{100 * low:.2f}, {100 * high:.2f}]"
            assert float(cells[column[name]]["v"]) == pytest.approx(mean, rel=1e-5)
        assert cells[column["simulated time s"]]["text"] == f"{want['sim_total_s']:.2f}"
        assert float(cells[column["simulated time s"]]["v"]) == pytest.approx(want["sim_total_s"], rel=1e-5)
        verdict = cells[column["verdict"]]["text"]
        assert verdict == want["verdict_authors_tests"] and verdict in ("better", "worse", "inconclusive", "baseline")
    # the claims table: every row of claims.csv, with its p-values
    claims = page.table("claims")
    saved = pd.read_csv(results / "claims.csv")
    assert len(claims["rows"]) == len(saved) == 12
    p_holm = [float(r["cells"][claims["header"].index("p Holm")]["v"]) for r in claims["rows"]]
    assert p_holm == pytest.approx(saved["gain_p_holm"].tolist(), rel=1e-5)
    assert "adjusted over all 12 comparisons" in "".join(page.text)
    # the spread over clients: one row per method, in the leaderboard's order, from the last 10 rounds
    spread = page.table("spread")
    assert [r["attrs"]["data-method"] for r in spread["rows"]] == [r["attrs"]["data-method"] for r in board["rows"]]
    assert spread["header"] == ["method", "seeds", "mean %, mirrored", "std over clients, mirrored",
                                "10th percentile %, mirrored", "spread, mirrored", "mean %, authors' tests",
                                "std over clients, authors' tests", "10th percentile %, authors' tests",
                                "spread, authors' tests"]
    down = next(r["cells"] for r in spread["rows"] if r["attrs"]["data-method"] == "down")
    assert [c["text"] for c in down[1:5]] == ["3", "70.00", "4.00", "64.00"] and down[8]["text"] == "-"
    # four figures, inline
    svgs = [attrs for tag, attrs in page.tags if tag == "svg" and attrs.get("role") == "img"]
    assert sum("viewbox" in a for a in svgs) >= 4 and text.count("<figure>") == 4
    assert "Accuracy against running time, with the Pareto front" in text
    # self-contained: one script (the page's own), no external style, image or script
    assert [tag for tag, _ in page.tags].count("script") == 1
    assert not [a for tag, a in page.tags if tag in ("link", "img", "script", "iframe") and
                any(k in a for k in ("src", "href")) and not str(a.get("src", "data:")).startswith("data:")]
    # the label with a script tag is text, in the tables and in the figures
    assert EVIL in "".join(page.text) and EVIL not in text
    assert "&lt;script&gt;window.pwned = 1&lt;/script&gt;" in text
    assert "seeds 1, 2, 3" in text


def test_provenance_and_configs(results):
    text = (results / "report.html").read_text()
    shown = "".join(Page(text).text).replace("\n", "")
    assert "runs12 (12 completed); seeds 1, 2, 3" in shown and f"by fedbench report {results}" in shown
    assert "Python, torch, Ray" in shown and "dates of the runsnot recorded in the results" in shown
    # each run's config on demand, escaped
    assert "Each run's configuration (1)" in text and "<summary>s_base_seed1</summary>" in text
    assert "<b>bold</b>" in shown and "&lt;b&gt;bold&lt;/b&gt;" in text


def test_a_folder_with_only_csv_files(results, tmp_path_factory):
    """A folder that keeps only its leaderboard, claims and PNG plots (as results/ commits some)."""
    only = tmp_path_factory.mktemp("only")
    for name in ("leaderboard.csv", "claims.csv"):
        shutil.copy(results / name, only / name)
    board = pd.read_csv(results / "leaderboard.csv")
    board.assign(verdict=board["verdict"].replace("inconclusive", "tie")).to_csv(only / "leaderboard_old.csv")
    (only / "plots").mkdir()
    png = io.BytesIO()
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(1, 1))
    fig.savefig(png, format="png")
    plt.close(fig)
    (only / "plots" / "s_acc_vs_round.png").write_bytes(png.getvalue())
    assert main(["report", str(only)]) == 0
    text = (only / "report.html").read_text()
    page = Page(text)
    assert len(page.table("board")["rows"]) == 4 and len(page.table("claims")["rows"]) == 12
    (img,) = [a for tag, a in page.tags if tag == "img"]
    assert img["src"] == "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    assert "Accuracy against running time, with the Pareto front" in text and "no Parquet files" in text
    # a leaderboard saved against a baseline before the verdict was renamed reads `tie` as inconclusive
    deltas = page.table("deltas")
    assert {r["cells"][3]["text"] for r in deltas["rows"]} <= {"better", "worse", "inconclusive", "baseline"}
    empty = tmp_path_factory.mktemp("empty")
    assert main(["report", str(empty)]) == 2


def test_a_uri_in_and_out(results, tmp_path, capsys):
    assert main(["report", f"file://{results}", "-o", f"file://{tmp_path}/out/page.html"]) == 0
    assert capsys.readouterr().out.strip() == f"{tmp_path}/out/page.html"
    assert len(Page((tmp_path / "out" / "page.html").read_text()).table("board")["rows"]) == 4


@pytest.mark.slow
def test_a_report_on_object_storage(results, monkeypatch):
    from s3server import s3_server

    with s3_server() as (env, fs):
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        for path in results.rglob("*"):
            if path.is_file() and path.name != "report.html":
                with fs.open_output_stream(f"bucket/r/{path.relative_to(results).as_posix()}") as f:
                    f.write(path.read_bytes())
        assert main(["report", "s3://bucket/r"]) == 0
        with fs.open_input_stream("bucket/r/report.html") as f:
            page = Page(f.read().decode())
    assert len(page.table("board")["rows"]) == 4 and len(page.table("claims")["rows"]) == 12
    assert "s3://bucket/r" in "".join(page.text)


# -- in a browser --------------------------------------------------------------------------------

class Chromium:
    """Headless Chromium driven over the DevTools protocol through a pipe (--remote-debugging-pipe:
    JSON messages ending in NUL on file descriptors 3 and 4), one page attached."""

    FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--remote-debugging-pipe", "--window-size=1280,900", "--hide-scrollbars"]

    def __init__(self, binary: str):
        self.profile = tempfile.mkdtemp(prefix="fedbench-chromium-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # bash puts the browser's ends on descriptors 3 and 4, where Chromium looks for them; moved
        # above 9 first, so that neither already sits on 3 or 4
        to_browser_r, from_browser_w = (self._above_9(fd) for fd in (to_browser_r, from_browser_w))
        self.proc = subprocess.Popen(
            ["bash", "-c", f'exec "$0" "$@" 3<&{to_browser_r} 4>&{from_browser_w} {to_browser_r}<&- '
                           f'{from_browser_w}>&-', binary, *self.FLAGS, f"--user-data-dir={self.profile}",
             "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            pass_fds=(to_browser_r, from_browser_w))
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._id = 0
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Page.enable", session=True)

    @staticmethod
    def _above_9(fd: int) -> int:
        import fcntl

        moved = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
        os.close(fd)
        return moved

    def call(self, method: str, session: bool = False, **params):
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._next()
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def wait_for(self, event: str):
        while self._next().get("method") != event:
            pass

    def _next(self) -> dict:
        while b"\0" not in self._buffer:
            chunk = os.read(self._from_browser, 1 << 16)
            if not chunk:
                raise RuntimeError("Chromium closed the pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def open(self, path):
        self.call("Page.navigate", session=True, url=f"file://{path}")
        self.wait_for("Page.loadEventFired")

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", session=True, expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"])
        return result["result"].get("value")

    def click(self, selector: str) -> None:
        """A real mouse click at the middle of the element."""
        box = self.js(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); e.scrollIntoView(); "
                      f"const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; }})()")
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", session=True, type=kind, x=box[0], y=box[1], button="left",
                      clickCount=1)

    def close(self):
        try:
            self.call("Browser.close")
        except (RuntimeError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope="module")
def browser():
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip("no chromium on this machine (Debian: apt-get install chromium; .ci/run installs it)")
    chromium = Chromium(binary)
    yield chromium
    chromium.close()


def _rows(chromium, css="board"):
    return chromium.js(f"Array.from(document.querySelectorAll('table.{css} tbody tr'))"
                       f".filter(r => !r.hidden).map(r => r.dataset.method)")


@pytest.mark.slow
def test_the_page_in_a_browser(results, browser):
    browser.open(results / "report.html")
    # it renders: a screenshot that is not blank (many colours, dark text on the light background)
    shot = base64.b64decode(browser.call("Page.captureScreenshot", session=True, format="png")["data"])
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(shot)).convert("RGB"), dtype=float)
    assert pixels.shape[0] >= 800 and pixels.std() > 20 and (pixels.mean(axis=2) < 100).mean() > 0.005
    assert len(np.unique(pixels.reshape(-1, 3)[::7], axis=0)) > 50
    # the label holding a script tag is text: its script never ran, its cell shows it
    assert browser.js("window.pwned === undefined && document.scripts.length === 1")
    assert browser.js("Array.from(document.querySelectorAll('table.board td')).some(td => td.textContent.startsWith("
                      + json.dumps(EVIL) + "))")
    csv = pd.read_csv(results / "leaderboard.csv")
    assert _rows(browser) == csv["method"].tolist()  # best first, as the CSV
    # a click on "simulated time s" sorts by it, a second click the other way
    header = browser.js("Array.from(document.querySelectorAll('table.board thead th')).map(th => th.textContent)")
    nth = header.index("simulated time s") + 1
    browser.click(f"table.board thead th:nth-child({nth}) button")
    assert _rows(browser) == csv.sort_values("sim_total_s")["method"].tolist()
    assert browser.js(f"document.querySelector('table.board thead th:nth-child({nth})').getAttribute('aria-sort')") \
        == "ascending"
    browser.click(f"table.board thead th:nth-child({nth}) button")
    assert _rows(browser) == csv.sort_values("sim_total_s", ascending=False)["method"].tolist()
    # the filter box keeps the rows that mention what is typed
    browser.click("label.filter input")
    browser.call("Input.insertText", session=True, text="paper")
    assert _rows(browser) == ["up"]
    # dark when the reader asks for it; printable
    light = browser.js("getComputedStyle(document.body).backgroundColor")
    browser.call("Emulation.setEmulatedMedia", session=True, features=[{"name": "prefers-color-scheme",
                                                                         "value": "dark"}])
    dark = browser.js("getComputedStyle(document.body).backgroundColor")
    assert light == "rgb(255, 255, 255)" and dark != light
    assert sum(int(v) for v in dark[4:-1].split(",")) < 150
    pdf = base64.b64decode(browser.call("Page.printToPDF", session=True)["data"])
    assert pdf.startswith(b"%PDF") and len(pdf) > 20_000
    # without scripts: the same tables, in the CSV's order, with no filter box
    browser.call("Emulation.setScriptExecutionDisabled", session=True, value=True)
    browser.open(results / "report.html")
    assert _rows(browser) == csv["method"].tolist()
    assert browser.js("document.querySelectorAll('label.filter, th button').length") == 0
