// Live refresh of the dashboard: reload every 30 s while the page is visible (the page
// works without it; the <body data-refresh> attribute turns it on).
(function () {
  var secs = parseInt(document.body.getAttribute("data-refresh") || "0", 10);
  if (!secs) { return; }
  setInterval(function () {
    if (document.visibilityState === "visible") { window.location.reload(); }
  }, secs * 1000);
})();
