"""In a real ComfyUI: the help panel's pages (web/docs) and the translations (locales/), in Chinese.

The server comes from tests/test_comfyui_real.py (same COMFYUI_PATH / COMFYUI_PYTHON / COMFYUI_STUBS,
same frontends: the pinned one and each of COMFYUI_FRONTEND_ROOTS), started with the frontend's
language set to Chinese (``Comfy.Locale`` in user/default/comfy.settings.json, as the settings dialog
writes it). Skipped like that module without ComfyUI, Chromium or Playwright.

- HTTP: every page is served where the frontend asks for it (``/extensions/<pack folder from the
  node's python_module>/docs/<NodeId>/zh.md``, then ``<NodeId>.md``), and ``/i18n`` carries the
  pack's nodeDefs and category for en and zh.
- Browser: a placed node and the node library show the Chinese names; selecting a node and opening
  its info shows our zh help page (DOM text). A screenshot of the panel is saved under the test's
  tmp folder, and copied to ``$SONIC_SCREENSHOTS/help_panel_<frontend version>.png`` when that is set.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

import os
from pathlib import Path as _Path

if not os.environ.get("COMFYUI_PATH") or not (_Path(os.environ["COMFYUI_PATH"]) / "main.py").is_file():
    pytest.skip("COMFYUI_PATH does not name a ComfyUI source tree (a folder with main.py)", allow_module_level=True)

from tests import test_comfyui_real as real  # skips this module without a ComfyUI tree
from tests._golden import REPO

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

LOCALE = "zh"
ZH_DEFS = json.loads((REPO / "locales" / LOCALE / "nodeDefs.json").read_text(encoding="utf-8"))
ZH_CATEGORY = json.loads(
    (REPO / "locales" / LOCALE / "main.json").read_text(encoding="utf-8"))["nodeCategories"]
SHOW_NODE_LIBRARY_JS = ("() => window.app.extensionManager.command.execute("
                        "'Workspace.ToggleSidebarTab.node-library')")
HELP_NODE = "SonicSampler"  # the node whose help page the browser opens
HELP_TIMEOUT_MS = 60_000
# Markdown the help panel renders (1.58.1: .comfy-markdown-content in the right-hand panel's Info tab;
# older frontends: the node library's help page).
HELP_TEXT_JS = """() => [...document.querySelectorAll(
    '.comfy-markdown-content, .node-help-content, .markdown-content')].map(e => e.innerText).join('\\n')"""


def _doc(node_id: str, lang: str) -> str:
    path = REPO / "web/docs" / (f"{node_id}.md" if lang == "en" else f"{node_id}/{lang}.md")
    return path.read_text(encoding="utf-8")


def _plain(markdown_line: str) -> str:
    """A Markdown line as the browser shows its text (no emphasis or code marks)."""
    return re.sub(r"[*`]", "", markdown_line).strip(" -")


@pytest.fixture(scope="module", params=["pinned", *real.FRONTEND_ROOTS],
                ids=lambda r: r if r == "pinned" else Path(r).parent.name + "@" + Path(r).parents[1].name)
def zh_server(request, tmp_path_factory):
    saved = real.BROWSER_SETTINGS
    real.BROWSER_SETTINGS = {**saved, "Comfy.Locale": LOCALE}  # _serve writes it before the start
    try:
        root = None if request.param == "pinned" else request.param
        yield from real._serve(tmp_path_factory.mktemp("comfyui_zh"), root)
    finally:
        real.BROWSER_SETTINGS = saved


def _pack_folder(server) -> str:
    """The name the frontend puts in /extensions/<name>/docs: the node's python_module
    ("custom_nodes.<pack folder>")."""
    info = real._request(f"{server.url}/object_info/{HELP_NODE}")[HELP_NODE]
    parts = info["python_module"].split(".")
    assert parts[0] == "custom_nodes" and len(parts) >= 2, info["python_module"]
    return parts[1]


def test_help_pages_and_translations_are_served(zh_server):
    folder = _pack_folder(zh_server)
    assert folder == real.PACK_LINK
    problems = []
    for node_id in ZH_DEFS:
        for lang, url in (("zh", f"/extensions/{folder}/docs/{node_id}/{LOCALE}.md"),
                          ("en", f"/extensions/{folder}/docs/{node_id}.md")):
            status, ctype, body = real._get_bytes(zh_server.url + url)
            if status != 200 or "text/html" in ctype or body.decode("utf-8") != _doc(node_id, lang):
                problems.append(f"GET {url}: {status} {ctype}, not web/docs' page")
    i18n = real._request(f"{zh_server.url}/i18n")
    for lang in ("en", LOCALE):
        want = json.loads((REPO / "locales" / lang / "nodeDefs.json").read_text(encoding="utf-8"))
        got = i18n.get(lang, {}).get("nodeDefs", {})
        problems += [f"/i18n {lang}: nodeDefs.{k} is not locales/{lang}'s"
                     for k in want if got.get(k) != want[k]]
        if i18n.get(lang, {}).get("nodeCategories", {}).get("Sonic") is None:
            problems.append(f"/i18n {lang}: nodeCategories.Sonic is missing")
    assert not problems, "\n".join(problems)


def _open(playwright, server):
    browser, page, dialogs = real._open_page(playwright, server)
    version = page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__ || 'unknown'")
    locale = page.evaluate("() => window.app.extensionManager.setting.get('Comfy.Locale')")
    assert locale == LOCALE, f"frontend {version}: Comfy.Locale is {locale!r} after writing {LOCALE!r}"
    page.evaluate("() => window.app.graph.clear()")
    return browser, page, version


def _place(page, node_id: str) -> dict:
    return page.evaluate("""(id) => { const n = LiteGraph.createNode(id); window.app.graph.add(n);
        n.pos = [500, 150]; window.app.canvas.setDirty(true, true);
        return {title: n.title, inputs: n.inputs.map(i => i.label || i.localized_name || i.name),
                widgets: (n.widgets || []).map(w => w.label || w.name)}; }""", node_id)


def test_chinese_names_on_the_canvas_and_in_the_node_library(zh_server):
    from playwright.sync_api import sync_playwright

    problems = []
    with sync_playwright() as p:
        browser, page, version = _open(p, zh_server)
        try:
            for node_id, entry in ZH_DEFS.items():
                placed = _place(page, node_id)
                if placed["title"] != entry["display_name"]:
                    problems.append(f"{version}: a placed {node_id} is titled {placed['title']!r}, "
                                    f"not {entry['display_name']!r}")
                shown = set(placed["inputs"]) | set(placed["widgets"])
                missing = [v["name"] for v in entry["inputs"].values() if v["name"] not in shown]
                if missing:
                    problems.append(f"{version}: {node_id} does not show the inputs {missing}; "
                                    f"shows {sorted(shown)}")
            page.evaluate(SHOW_NODE_LIBRARY_JS)
            page.get_by_text(ZH_CATEGORY["Sonic"], exact=True).first.click()
            page.wait_for_timeout(real.SETTLE_MS)
            for node_id, entry in ZH_DEFS.items():
                # long names are cut with an ellipsis in the tree: the start must show
                head = entry["display_name"][:10]
                if not page.get_by_text(head).count():
                    problems.append(f"{version}: the node library does not show {entry['display_name']!r}")
        finally:
            browser.close()
    assert not problems, "\n".join(problems)


def _open_help(page, node_id: str, display_name: str) -> str:
    """Select the node and open its help the way a user does; which way this frontend offers."""
    page.evaluate("""(id) => { const n = window.app.graph._nodes.find(n => n.type === id);
        window.app.canvas.selectNode(n); window.app.canvas.setDirty(true, true); }""", node_id)
    page.wait_for_timeout(real.SETTLE_MS)
    info = page.locator('[data-testid="info-button"]')
    if info.count():
        info.first.click()
        return "selection toolbox info button"
    # older frontends: the node library's help (?) button on the node's row
    page.evaluate(SHOW_NODE_LIBRARY_JS)
    page.get_by_text(ZH_CATEGORY["Sonic"], exact=True).first.click()
    row = page.get_by_text(display_name, exact=True).first
    row.hover()
    button = row.locator("xpath=ancestor::*[.//i[contains(@class,'pi-question')]][1]"
                         "//i[contains(@class,'pi-question')]")
    if not button.count():
        pytest.skip("this frontend offers no node help button (selection toolbox or node library)")
    button.first.click()
    return "node library help button"


def test_help_panel_shows_the_chinese_page(zh_server, tmp_path):
    """The help panel renders web/docs/<NodeId>/zh.md: its title, description, an input's Chinese name
    and tooltip, and the node's troubleshooting; a screenshot is kept."""
    from playwright.sync_api import sync_playwright

    doc = _doc(HELP_NODE, LOCALE)
    entry = ZH_DEFS[HELP_NODE]
    steps = entry["inputs"]["steps"]
    trouble = doc.split("## 常见问题", 1)[1].strip().splitlines()[0]
    expected = [entry["display_name"], entry["description"][:40], steps["name"], steps["tooltip"],
                "常见问题", _plain(trouble)[:30]]
    responses: list[tuple[int, str]] = []
    with sync_playwright() as p:
        browser, page, version = _open(p, zh_server)
        page.on("response", lambda r: responses.append((r.status, r.url)) if "/docs/" in r.url else None)
        try:
            _place(page, HELP_NODE)
            how = _open_help(page, HELP_NODE, entry["display_name"])
            try:
                page.wait_for_function(f"() => ({HELP_TEXT_JS})().includes({json.dumps(expected[-1])})",
                                       timeout=HELP_TIMEOUT_MS)
            except Exception:  # the assertion below names what is shown instead
                pass
            text = page.evaluate(HELP_TEXT_JS)
            shot = tmp_path / f"help_panel_{version}.png"
            page.screenshot(path=str(shot))
        finally:
            browser.close()
    if os.environ.get("SONIC_SCREENSHOTS"):
        shutil.copy(shot, Path(os.environ["SONIC_SCREENSHOTS"]) / shot.name)
    missing = [e for e in expected if e not in text]
    assert not missing, (f"frontend {version}, help opened by the {how}: the panel lacks {missing}; "
                         f"requests {responses}; it shows:\n{text[:1500]}")
    zh_url = f"/docs/{HELP_NODE}/{LOCALE}.md"
    assert any(s == 200 and u.endswith(zh_url) for s, u in responses), responses
    assert shot.stat().st_size > 10_000, f"{shot} is nearly empty"
