"use strict";
// The one catalogue of UI strings. A site adds a language by adding a block here (same keys).
// Language: ?lang=xx, else the browser's, else English. Elements carry data-i18n="key" (text) or
// data-i18n-title / data-i18n-placeholder; scripts call T("key", {n: 3}).
// Texts the server composes (tile and station reasons "reason.*", alarm messages "alarm.*") arrive as
// {key, args} next to their English text; tr() translates them (deploy/console/texts.py lists those keys,
// and tests/deploy/console/test_i18n.py checks that every language here has every one). Arguments are
// data (a station may have sent them): the result is always inserted as text, never as HTML.
const CATALOGUE = {
  en: {
    "nav.live": "Live", "nav.history": "History & review", "nav.shifts": "Shifts", "nav.export": "Export",
    "nav.users": "Users", "nav.password": "Password", "nav.logout": "Log out",
    "conn.connecting": "connecting", "conn.live": "live", "conn.reconnecting": "reconnecting",
    "feed.lost": "Live feed lost: the tiles below are not live. Reconnecting…",
    "tile.no_signal": "NO SIGNAL", "tile.stale": "STALE", "tile.waiting": "WAITING",
    "reason.feed_lost": "console feed lost", "reason.no_verdict_yet": "no verdict yet",
    "reason.no_verdict_for": "no verdict for {n} s", "age.s": "{n} s ago", "age.min": "{n} min ago", "age.h": "{n} h ago",
    "events.title": "Recent defects & uncertain", "shift.title": "This shift:", "shift.all": "(all shifts)",
    "col.camera": "Camera", "col.ok": "OK", "col.defect": "Defect", "col.uncertain": "Uncertain", "col.yield": "Yield",
    "review.confirm": "Confirm", "review.confirm_as": "Confirm as chosen class", "review.reject": "Reject (false alarm)",
    "review.relabel": "Relabel", "review.class": "Class", "review.close": "Close", "review.choose": "— choose the class —",
    "review.need_class": "choose the class this part is, then confirm", "alarm.ack": "Acknowledge",
    "alarm.acked_by": "acknowledged by {user} {time}",
    "history.title": "History and review", "filter.station": "Station", "filter.camera": "Camera", "filter.class": "Class",
    "filter.verdict": "Verdict", "filter.reviewed": "Reviewed", "filter.from": "From", "filter.to": "To", "filter.search": "Search",
    "filter.all": "all", "filter.to_review": "to review", "filter.reviewed_yes": "reviewed",
    "col.time": "Time", "col.part": "Part", "col.verdict": "Verdict", "col.class": "Class", "col.conf": "Conf.", "col.review": "Review",
    "col.shift": "Shift", "col.start": "Start", "col.frames": "Frames",
    "rv.to_review": "to review", "rv.confirm": "confirmed", "rv.reject": "rejected", "rv.relabel": "relabelled", "rv.by": "by",
    "pager.prev": "Previous (p)", "pager.next": "Next (n)", "pager.info": "page {page} of {pages} · {total} frames",
    "shifts.title": "Yield per camera and shift", "shifts.times_in": "times in {zone}",
    "users.title": "Users", "users.add": "Add a user", "users.name": "Name", "users.role": "Role", "users.state": "State",
    "users.new_password": "New password", "users.add_btn": "Add", "users.my_password": "My password",
    "users.current": "Current", "users.new": "New", "users.change": "Change", "users.set_password": "Set password",
    "users.enable": "Enable", "users.disable": "Disable", "users.active": "active", "users.disabled": "disabled", "users.saved": "saved",
    "export.title": "Export verdicts (CSV)", "export.download": "Download CSV",
    "login.user": "User", "login.password": "Password", "login.submit": "Log in", "login.failed": "Wrong user name or password.",
    "reason.no_heartbeat_yet": "daemon down: no heartbeat yet",
    "reason.no_heartbeat_for": "daemon down: no heartbeat for over {s} s",
    "reason.reloading": "model reloading", "reason.daemon_starting": "daemon starting",
    "reason.daemon_stopping": "daemon stopping", "reason.daemon_stopped": "daemon stopped", "reason.daemon_state": "daemon {state}",
    "reason.camera_ended": "camera down: source ended{errors}", "reason.camera_no_frame_for": "camera down: no frame for {s} s{errors}",
    "reason.camera_no_frame_yet": "camera down: no frame yet{errors}", "reason.unreadable_frames": ", {n} unreadable frames",
    "reason.camera_down": "camera down",
    "alarm.defects_in_row": "{station}/{camera}: {n} defects in a row",
    "alarm.defect_rate": "{station}/{camera}: defect rate {rate}% over {window} s (alarm at {threshold}%)",
    "alarm.uncertain_rate": "{station}/{camera}: uncertain rate {rate}% over {window} s (alarm at {threshold}%)",
    "alarm.model_fallback": "{station}: model fallback: {detail}", "alarm.model_refused": "{station}: model refused: {detail}",
    "alarm.station_down": "{station}: station down ({reason})", "alarm.camera_down": "{station}/{camera}: {reason}",
    "alarm.cleared": "cleared {time}", "station.down": "down", "state.serving": "serving", "state.reloading": "reloading",
    "state.starting": "starting", "state.stopping": "stopping", "state.stopped": "stopped", "state.unknown": "unknown",
    "tile.defects_per_min": "{n} defects/min", "who.kiosk": "kiosk (read-only)", "shift.since": "{name} since {time}",
    "ev.confirmed": "confirmed by {user}", "ev.rejected": "rejected by {user}", "ev.relabelled": "relabelled {label} by {user}",
    "nav.alarms": "Alarms", "alarms.title": "Alarm history", "filter.kind": "Kind", "filter.state": "State",
    "filter.acked": "Acknowledged", "alarms.open": "open", "alarms.cleared": "cleared", "alarms.acked": "acknowledged",
    "alarms.unacked": "unacknowledged", "alarms.none": "No alarms match.", "alarms.times": "times: {zone}",
    "alarms.ack_failed": "not acknowledged: {error}", "col.raised": "Raised", "col.cleared": "Cleared",
    "col.station": "Station", "col.rule": "Rule", "col.message": "Message", "col.state": "State", "col.acked": "Acknowledged",
    "pager.alarms_info": "page {page} of {pages} · {total} alarms",
    "kind.defect_rate": "defect rate", "kind.uncertain_rate": "uncertain rate", "kind.defects_in_row": "defects in a row",
    "kind.camera_down": "camera down", "kind.station_down": "station down", "kind.model_fallback": "model fallback / refused",
  },
  de: {
    "nav.live": "Live", "nav.history": "Verlauf & Prüfung", "nav.shifts": "Schichten", "nav.export": "Export",
    "nav.users": "Benutzer", "nav.password": "Passwort", "nav.logout": "Abmelden",
    "conn.connecting": "verbinde", "conn.live": "live", "conn.reconnecting": "verbinde neu",
    "feed.lost": "Live-Verbindung verloren: Die Kacheln sind nicht aktuell. Verbinde neu…",
    "tile.no_signal": "KEIN SIGNAL", "tile.stale": "VERALTET", "tile.waiting": "WARTE",
    "reason.feed_lost": "Verbindung zur Konsole verloren", "reason.no_verdict_yet": "noch kein Ergebnis",
    "reason.no_verdict_for": "seit {n} s kein Ergebnis", "age.s": "vor {n} s", "age.min": "vor {n} min", "age.h": "vor {n} h",
    "events.title": "Letzte Fehler & unsichere Teile", "shift.title": "Diese Schicht:", "shift.all": "(alle Schichten)",
    "col.camera": "Kamera", "col.ok": "OK", "col.defect": "Fehler", "col.uncertain": "Unsicher", "col.yield": "Ausbeute",
    "review.confirm": "Bestätigen", "review.confirm_as": "Als gewählte Klasse bestätigen", "review.reject": "Verwerfen (Fehlalarm)",
    "review.relabel": "Umbenennen", "review.class": "Klasse", "review.close": "Schließen", "review.choose": "— Klasse wählen —",
    "review.need_class": "erst die Klasse des Teils wählen, dann bestätigen", "alarm.ack": "Quittieren",
    "alarm.acked_by": "quittiert von {user} {time}",
    "history.title": "Verlauf und Prüfung", "filter.station": "Station", "filter.camera": "Kamera", "filter.class": "Klasse",
    "filter.verdict": "Ergebnis", "filter.reviewed": "Geprüft", "filter.from": "Von", "filter.to": "Bis", "filter.search": "Suchen",
    "filter.all": "alle", "filter.to_review": "zu prüfen", "filter.reviewed_yes": "geprüft",
    "col.time": "Zeit", "col.part": "Teil", "col.verdict": "Ergebnis", "col.class": "Klasse", "col.conf": "Konf.", "col.review": "Prüfung",
    "col.shift": "Schicht", "col.start": "Beginn", "col.frames": "Bilder",
    "rv.to_review": "zu prüfen", "rv.confirm": "bestätigt", "rv.reject": "verworfen", "rv.relabel": "umbenannt", "rv.by": "von",
    "pager.prev": "Zurück (p)", "pager.next": "Weiter (n)", "pager.info": "Seite {page} von {pages} · {total} Bilder",
    "shifts.title": "Ausbeute je Kamera und Schicht", "shifts.times_in": "Zeiten in {zone}",
    "users.title": "Benutzer", "users.add": "Benutzer anlegen", "users.name": "Name", "users.role": "Rolle", "users.state": "Status",
    "users.new_password": "Neues Passwort", "users.add_btn": "Anlegen", "users.my_password": "Mein Passwort",
    "users.current": "Aktuell", "users.new": "Neu", "users.change": "Ändern", "users.set_password": "Passwort setzen",
    "users.enable": "Aktivieren", "users.disable": "Sperren", "users.active": "aktiv", "users.disabled": "gesperrt", "users.saved": "gespeichert",
    "export.title": "Ergebnisse exportieren (CSV)", "export.download": "CSV herunterladen",
    "login.user": "Benutzer", "login.password": "Passwort", "login.submit": "Anmelden", "login.failed": "Falscher Benutzername oder falsches Passwort.",
    "reason.no_heartbeat_yet": "Stationsdienst aus: noch kein Lebenszeichen",
    "reason.no_heartbeat_for": "Stationsdienst aus: seit über {s} s kein Lebenszeichen",
    "reason.reloading": "Modell wird neu geladen", "reason.daemon_starting": "Stationsdienst startet",
    "reason.daemon_stopping": "Stationsdienst wird beendet", "reason.daemon_stopped": "Stationsdienst beendet",
    "reason.daemon_state": "Stationsdienst: {state}",
    "reason.camera_ended": "Kamera aus: Quelle zu Ende{errors}", "reason.camera_no_frame_for": "Kamera aus: seit {s} s kein Bild{errors}",
    "reason.camera_no_frame_yet": "Kamera aus: noch kein Bild{errors}", "reason.unreadable_frames": ", {n} unlesbare Bilder",
    "reason.camera_down": "Kamera aus",
    "alarm.defects_in_row": "{station}/{camera}: {n} Fehler in Folge",
    "alarm.defect_rate": "{station}/{camera}: Fehlerquote {rate} % in {window} s (Alarm ab {threshold} %)",
    "alarm.uncertain_rate": "{station}/{camera}: Quote unsicher {rate} % in {window} s (Alarm ab {threshold} %)",
    "alarm.model_fallback": "{station}: Ersatzmodell aktiv: {detail}", "alarm.model_refused": "{station}: Modell abgelehnt: {detail}",
    "alarm.station_down": "{station}: Station aus ({reason})", "alarm.camera_down": "{station}/{camera}: {reason}",
    "alarm.cleared": "beendet {time}", "station.down": "aus", "state.serving": "in Betrieb", "state.reloading": "lädt neu",
    "state.starting": "startet", "state.stopping": "stoppt", "state.stopped": "gestoppt", "state.unknown": "unbekannt",
    "tile.defects_per_min": "{n} Fehler/min", "who.kiosk": "Kiosk (nur lesen)", "shift.since": "{name} seit {time}",
    "ev.confirmed": "bestätigt von {user}", "ev.rejected": "verworfen von {user}", "ev.relabelled": "umbenannt in {label} von {user}",
    "nav.alarms": "Alarme", "alarms.title": "Alarmverlauf", "filter.kind": "Art", "filter.state": "Zustand",
    "filter.acked": "Quittiert", "alarms.open": "aktiv", "alarms.cleared": "beendet", "alarms.acked": "quittiert",
    "alarms.unacked": "nicht quittiert", "alarms.none": "Keine passenden Alarme.", "alarms.times": "Zeiten: {zone}",
    "alarms.ack_failed": "nicht quittiert: {error}", "col.raised": "Ausgelöst", "col.cleared": "Beendet",
    "col.station": "Station", "col.rule": "Regel", "col.message": "Meldung", "col.state": "Zustand", "col.acked": "Quittiert",
    "pager.alarms_info": "Seite {page} von {pages} · {total} Alarme",
    "kind.defect_rate": "Fehlerquote", "kind.uncertain_rate": "Quote unsicher", "kind.defects_in_row": "Fehler in Folge",
    "kind.camera_down": "Kamera aus", "kind.station_down": "Station aus", "kind.model_fallback": "Ersatzmodell / abgelehnt",
  },
};
const LANG = (() => {
  const want = new URLSearchParams(location.search).get("lang") || (navigator.language || "en").slice(0, 2);
  return CATALOGUE[want] ? want : "en";
})();
const HAS = (o, k) => o !== null && typeof o === "object" && Object.prototype.hasOwnProperty.call(o, k);
const TEXT_KEY = /^[a-z][a-z0-9_]*(\.[a-z0-9_]+)+$/;
function lookup(key) {  // own keys only: "__proto__" or "constructor" from a server is no template
  for (const lang of [LANG, "en"]) if (HAS(CATALOGUE, lang) && HAS(CATALOGUE[lang], key)) return CATALOGUE[lang][key];
  return null;
}
function argText(v, depth) {
  if (v === null || v === undefined) return "";
  if (typeof v === "number") return Number.isFinite(v) ? v.toLocaleString(LANG, { maximumFractionDigits: 3, useGrouping: false }) : "";
  if (typeof v === "object") return depth < 4 ? tr(v, "", depth + 1) : "";  // a text inside a text (a reason in an alarm)
  return String(v);
}
function T(key, vars = {}, depth = 0) {
  const s = lookup(key);
  if (s === null) return key;
  return s.replace(/\{(\w+)\}/g, (_, k) => (HAS(vars, k) ? argText(vars[k], depth) : ""));
}
// A text the server composed, {key, args}, in this page's language; `fallback` (the server's English) when
// this catalogue does not know the key. Callers put the result into textContent / attributes only.
function tr(text, fallback = "", depth = 0) {
  if (!text || typeof text.key !== "string" || !TEXT_KEY.test(text.key) || lookup(text.key) === null) return fallback || "";
  const args = HAS(text, "args") && text.args && typeof text.args === "object" && !Array.isArray(text.args) ? text.args : {};
  return T(text.key, args, depth);
}
// obj[field] is English; obj[field + "_key"] / obj[field + "_args"] the same text to translate.
function trField(obj, field) {
  const key = obj[field + "_key"];
  return tr(key ? { key, args: obj[field + "_args"] } : null, typeof obj[field] === "string" ? obj[field] : "");
}
function applyI18n(root = document) {
  document.documentElement.lang = LANG;
  for (const e of root.querySelectorAll("[data-i18n]")) e.textContent = T(e.dataset.i18n);
}
document.addEventListener("DOMContentLoaded", () => applyI18n());
