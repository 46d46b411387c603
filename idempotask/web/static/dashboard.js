// idempotask dashboard: the overview refreshes its live part without reloading the page.
// The only script of the dashboard; served from the app itself (the Content-Security-Policy
// allows no other). The fragment is HTML rendered and escaped by the server.
(function () {
  "use strict";
  var live = document.getElementById("live");
  if (!live) {
    return;
  }
  var url = live.getAttribute("data-live");
  var every = Math.max(0.2, parseFloat(live.getAttribute("data-every")) || 5) * 1000;

  function next() {
    var counting = live.querySelector("[data-counting]") !== null;
    window.setTimeout(refresh, counting ? Math.min(every, 1000) : every);
  }

  function refresh() {
    if (document.hidden) {
      next();
      return;
    }
    fetch(url, { credentials: "same-origin", cache: "no-store", headers: { Accept: "text/html" } })
      .then(function (response) {
        if (!response.ok) {
          throw new Error("HTTP " + response.status);
        }
        return response.text();
      })
      .then(function (html) {
        live.innerHTML = html;
        live.removeAttribute("data-stale");
      })
      .catch(function () {
        live.setAttribute("data-stale", "1"); // shown by the stylesheet; tried again later
      })
      .then(next);
  }

  next();
})();
