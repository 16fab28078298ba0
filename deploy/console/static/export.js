"use strict";
// The export form sends naive local times plus the line's zone (tz); the server turns them into UTC.
(async () => {
  const r = await fetch("/api/me");
  const me = r.ok ? await r.json() : {};
  const zone = me.time_zone || Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC";
  document.getElementById("tz").value = zone;
  for (const e of document.querySelectorAll(".zone")) e.textContent = zone;
  document.getElementById("csv-form").addEventListener("formdata", (ev) => {
    for (const k of ["from", "to"]) {
      const v = ev.formData.get(k);
      if (v) ev.formData.set(k, v.trim().replace(" ", "T"));
    }
  });
})();
