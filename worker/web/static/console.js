// Follows an ad hoc reconcile on the family page until it finishes (no inline scripts:
// the Content-Security-Policy allows only this file).
"use strict";
(function () {
  const box = document.getElementById("adhoc");
  if (!box) return;
  const task = box.dataset.task;
  const final = ["done", "failed", "lost", "skipped"];
  let tries = 0;
  function tick() {
    tries += 1;
    fetch("/adhoc/" + encodeURIComponent(task), {headers: {"Accept": "application/json"},
                                                 credentials: "same-origin"})
      .then(function (r) { return r.json(); })
      .then(function (body) {
        box.textContent = body.text;
        box.dataset.state = body.state;
        if (final.indexOf(body.state) >= 0) {
          if (body.state === "done") {
            const a = document.createElement("a");
            a.href = window.location.pathname;
            a.id = "adhoc-reload";
            a.textContent = " · show the new results";
            box.appendChild(a);
          }
          return;
        }
        if (tries < 900) window.setTimeout(tick, 1000);
      })
      .catch(function () { if (tries < 900) window.setTimeout(tick, 2000); });
  }
  tick();
})();
