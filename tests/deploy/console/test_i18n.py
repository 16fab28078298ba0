"""The one UI catalogue (static/i18n.js) covers every text the server composes, in every language.

The keys the Python side can emit are read from the source (every ``Text("key", ...)`` call in
deploy/console; a key that is not a literal fails here, so none escapes the check); the catalogue is
read by parsing the JavaScript object itself. In a real Chromium (marked `browser`), a German page shows
a translated tile reason and a translated alarm banner, and a station's HTML in an argument stays text.
"""

from __future__ import annotations

import ast
import json
import re
import threading
from pathlib import Path

import pytest

from deploy.console.texts import ARG_CHARS, EN, OPTIONAL, Text
from tests.deploy.console.test_browser import browser, login  # noqa: F401  (the module's Chromium fixture)

ROOT = Path(__file__).resolve().parents[3]
CONSOLE = ROOT / "deploy" / "console"
PLACEHOLDER = re.compile(r"\{(\w+)\}")


def _js_object_to_json(src: str) -> str:
    """A JS object literal of string / identifier keys and string values -> JSON (comments, trailing commas)."""
    out: list[str] = []
    i, n = 0, len(src)
    while i < n:
        c = src[i]
        if c in "\"'":
            j = i + 1
            while src[j] != c:
                j += 2 if src[j] == "\\" else 1
            body = src[i + 1 : j]
            out.append(json.dumps(json.loads('"' + body.replace('\\"', '"').replace('"', '\\"') + '"')))
            i = j + 1
        elif src.startswith("//", i):
            i = src.index("\n", i)
        elif c.isalpha() or c == "_":
            m = re.compile(r"[A-Za-z_][\w-]*").match(src, i)
            assert m is not None
            out.append(json.dumps(m.group(0)))
            i = m.end()
        elif c == ",":
            rest = src[i + 1 :].lstrip()
            if not rest.startswith(("}", "]")):  # trailing commas are JS, not JSON
                out.append(c)
            i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def catalogue() -> dict[str, dict[str, str]]:
    src = (CONSOLE / "static" / "i18n.js").read_text(encoding="utf-8")
    start = src.index("const CATALOGUE = ") + len("const CATALOGUE = ")
    depth, end = 0, start
    for end in range(start, len(src)):  # the matching brace (no braces inside the catalogue's strings)
        depth += {"{": 1, "}": -1}.get(src[end], 0)
        if depth == 0:
            break
    return json.loads(_js_object_to_json(src[start : end + 1]))


def _literal_keys(node: ast.expr) -> list[str] | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.IfExp):
        a, b = _literal_keys(node.body), _literal_keys(node.orelse)
        return None if a is None or b is None else a + b
    return None


def emitted() -> dict[str, list[tuple[str, set[str], bool]]]:
    """key -> [(where, keyword argument names, whether ``**`` adds more)] of every Text(...) call in deploy/console."""
    found: dict[str, list[tuple[str, set[str], bool]]] = {}
    for path in sorted(CONSOLE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
            if name != "Text":
                continue
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            assert node.args, f"{where}: Text() without a key"
            keys = _literal_keys(node.args[0])
            assert keys is not None, f"{where}: the key must be a literal string (or a choice of literals)"
            kwargs = {k.arg for k in node.keywords if k.arg is not None}
            more = any(k.arg is None for k in node.keywords)
            for key in keys:
                found.setdefault(key, []).append((where, kwargs, more))
    return found


def test_every_key_the_server_can_send_is_in_every_language():
    keys = emitted()
    cat = catalogue()
    assert {"en", "de"} <= set(cat), "English and German ship"
    # the extraction sees the composed texts (tile reasons, station reasons, alarm messages)
    assert {"reason.camera_no_frame_for", "reason.no_heartbeat_for", "alarm.station_down", "alarm.defect_rate"} <= set(
        keys
    )
    for key, sites in keys.items():
        assert key in EN, f"{sites[0][0]}: {key!r} is not in deploy/console/texts.py EN"
        for lang, table in cat.items():
            assert key in table, f"{sites[0][0]}: {key!r} missing from the {lang!r} table of static/i18n.js"
        wanted = set(PLACEHOLDER.findall(EN[key]))
        for where, kwargs, more in sites:  # what a call gives is what the text uses
            assert kwargs <= wanted, f"{where}: {key!r} has no placeholder for {sorted(kwargs - wanted)}"
            assert more or wanted - OPTIONAL <= kwargs, f"{where}: {key!r} needs {sorted(wanted - kwargs)}"
    for key in EN:  # nothing in EN that the server no longer sends, and the page's English is the server's
        assert key in keys, f"texts.py EN has {key!r}, which no Text(...) call sends"
        assert cat["en"][key] == EN[key], f"{key!r}: static/i18n.js English differs from texts.py"


def test_every_language_has_every_key_with_the_same_placeholders():
    cat = catalogue()
    en = cat["en"]
    for lang, table in cat.items():
        assert set(table) == set(en), (
            f"{lang}: missing {sorted(set(en) - set(table))}, extra {sorted(set(table) - set(en))}"
        )
        for key, text in table.items():
            assert set(PLACEHOLDER.findall(text)) == set(PLACEHOLDER.findall(en[key])), f"{lang} {key!r}: {text!r}"


def test_text_arguments_are_data_cut_and_cleaned():
    hostile = '<img src=x onerror="alert(1)">\x1b[31m' + "x" * 500
    t = Text("alarm.model_fallback", station="st1", detail=hostile)
    (_, detail) = t.args[1]
    assert isinstance(detail, str) and len(detail) == ARG_CHARS and "\x1b" not in detail
    assert t.render().startswith('st1: model fallback: <img src=x onerror="alert(1)"> [31m')
    nested = Text("alarm.camera_down", station="st1", camera="cam1", reason=Text("reason.camera_no_frame_for", s=12))
    assert nested.render() == "st1/cam1: camera down: no frame for 12 s"
    assert nested.view() == {
        "key": "alarm.camera_down",
        "args": {
            "station": "st1",
            "camera": "cam1",
            "reason": {"key": "reason.camera_no_frame_for", "args": {"s": 12}},
        },
    }
    assert Text("reason.no_heartbeat_for", s=float("nan")).view()["args"] == {"s": None}  # JSON stays standard
    assert Text("reason.no_heartbeat_for", s=1.5) == Text("reason.no_heartbeat_for", s=1.5)
    with pytest.raises(KeyError):
        Text("reason.not_a_key")


@pytest.mark.browser
def test_a_german_page_translates_tile_reasons_and_the_alarm_banner(browser, console_factory):  # noqa: F811
    from deploy.console.loadgen import FakeStation, status_message
    from runtime.serving.messages import status_topic

    hostile = '<img src=x onerror="window.pwned=1">bundle 2.0 refused'
    st = FakeStation("st1")
    stop = threading.Event()

    def beat() -> None:  # cam2 is down with unreadable frames; the model is a fallback (the station's words)
        while not stop.is_set():
            hb = status_message("st1", {"cam1": True, "cam2": False})
            hb["cameras"]["cam2"] |= {"last_frame_age_s": 12.0, "decode_errors": 3}
            hb["model"]["boot_fallback"] = hostile
            st.send(status_topic("st1"), hb)
            for seq in range(3):
                st.verdict("cam1", seq, "defect")
            stop.wait(0.2)

    threading.Thread(target=beat, daemon=True).start()
    try:
        rules = (
            '[alarms]\n[[alarms.rules]]\nname = "fallback"\nkind = "model_fallback"\n\n'
            '[[alarms.rules]]\nname = "3 in a row"\nkind = "defects_in_row"\ncount = 3\n'
        )
        con = console_factory([{"name": "st1", "endpoint": st.endpoint}], extra_toml=rules)
        page = login(browser, con.base, "olga")
        page.goto(con.base + "/?lang=de")
        page.wait_for_selector("#conn.up", timeout=10_000)
        tile = '[data-tile="st1/cam2"][data-signal="no_signal"]'
        page.wait_for_selector(tile, timeout=15_000)
        assert page.inner_text(f"{tile} .verdict") == "KEIN SIGNAL"
        assert page.inner_text(f"{tile} .reason") == "Kamera aus: seit 12 s kein Bild, 3 unlesbare Bilder"
        page.wait_for_function("() => document.querySelectorAll('#alarm-banner li.active').length == 2", timeout=15_000)
        banner = page.inner_text("#alarm-banner")
        assert "st1/cam1: 3 Fehler in Folge" in banner
        assert f"st1: Ersatzmodell aktiv: {hostile}" in banner  # the station's HTML is shown as text
        assert page.locator("#alarm-banner img").count() == 0
        assert page.evaluate("() => window.pwned") is None
        assert page.inner_text("#alarm-banner button.ack").startswith("Quittieren")
        page.goto(con.base + "/?lang=en")  # the same alarm, in English (the server's text)
        page.wait_for_selector("#alarm-banner li.active", timeout=15_000)
        assert "st1/cam1: 3 defects in a row" in page.inner_text("#alarm-banner")
    finally:
        stop.set()
        st.close()


def test_alarm_rows_keep_english_and_the_key_for_the_page(tmp_path):
    from deploy.console.alarm_rules import Rule
    from deploy.console.alarms import Alarms
    from deploy.console.loadgen import status_message, verdict_message
    from deploy.console.webhook import Webhook
    from tests.deploy.console.test_alarms import _engine

    alarms, store, _ = _engine(tmp_path, Rule("row", "defects_in_row", count=2), Rule("fb", "model_fallback"))
    for seq in range(2):
        alarms.on_verdict(verdict_message("st1", "cam1", seq, "defect"), now=100.0 + seq)
    hb = status_message("st1", {"cam1": True})
    hb["model"]["boot_fallback"] = "<b>bundle 2.0</b>\nrefused"
    alarms.on_status(hb, now=102.0)
    by_rule = {a["rule"]: a for a in alarms.views()}
    row = by_rule["row"]
    assert row["message"] == "st1/cam1: 2 defects in a row"  # English for the webhook, PLC bridge, logs
    assert (row["message_key"], row["message_args"]) == (
        "alarm.defects_in_row",
        {"station": "st1", "camera": "cam1", "n": 2},
    )
    fb = by_rule["fb"]
    assert fb["message_key"] == "alarm.model_fallback" and fb["message_args"]["detail"] == "<b>bundle 2.0</b> refused"
    body = json.loads(Webhook.body("raised", row, alarms.views()))
    assert body["alarm"]["message_key"] == "alarm.defects_in_row" and body["alarm"]["message"] == row["message"]
    history = {h["rule"]: h for h in alarms.history()}  # stored rows: the page translates these too
    assert history["row"]["message_args"] == row["message_args"] and history["row"]["message"] == row["message"]
    again = Alarms(alarms.cfg, store.engine, alarms.live)  # reloaded after a restart
    assert {a["message_key"] for a in again.views()} == {"alarm.defects_in_row", "alarm.model_fallback"}
    store.close()


def test_recent_snapshots_are_bounded_in_bytes_and_age():
    from deploy.console.snapfiles import RecentSnapshots

    cache = RecentSnapshots(max_bytes=800, max_age_s=60.0)
    for i in range(10):
        cache.put("/spool", f"{i}.jpg", bytes(100))
    assert cache.size <= 800 and cache.get("/spool", "0.jpg") is None and cache.get("/spool", "9.jpg") == bytes(100)
    cache.put("/spool", "big.jpg", bytes(500))  # over an eighth of the budget: never kept
    assert cache.get("/spool", "big.jpg") is None
    cache.max_age_s = 0.0
    assert cache.get("/spool", "9.jpg") is None and "9.jpg" not in {k[1] for k in cache.items}
