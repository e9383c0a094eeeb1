// Installed first (in <head>) so errors of later scripts, syntax errors included, are recorded.
window.__reportErrors = [];
window.addEventListener("error", function (e) {
  var msg = (e && e.message ? e.message : String(e)) + (e && e.lineno ? " (line " + e.lineno + ")" : "");
  window.__reportErrors.push(msg);
  var box = document.getElementById("js-errors");
  if (box) { box.hidden = false; box.textContent += msg + "\n"; }
});
window.addEventListener("unhandledrejection", function (e) {
  window.__reportErrors.push("unhandled rejection: " + (e && e.reason));
});
