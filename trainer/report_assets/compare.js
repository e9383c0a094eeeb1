(function () {
  "use strict";
  var body = document.body;
  var box = document.getElementById("js-errors");
  if (box && window.__reportErrors && window.__reportErrors.length) {
    box.hidden = false; box.textContent = window.__reportErrors.join("\n") + "\n";
  }
  var prompts = Array.prototype.slice.call(document.querySelectorAll("details.cmp-prompt"));
  var texts = prompts.map(function (d) {
    var p = d.querySelector(".prompt-text");
    return ((p ? p.textContent : "") + "\n" + (d.getAttribute("data-prompt-id") || "")).toLowerCase();
  });
  var filter = document.getElementById("prompt-filter");
  var onlyDisagree = document.getElementById("only-disagree");
  var count = document.getElementById("visible-count");

  function apply() {
    var q = filter.value.trim().toLowerCase(), only = onlyDisagree.checked, shown = 0;
    prompts.forEach(function (d, i) {
      var ok = (!q || texts[i].indexOf(q) !== -1) && (!only || Number(d.getAttribute("data-disagree")) > 0);
      d.hidden = !ok;
      if (ok) shown++;
    });
    count.textContent = shown + " of " + prompts.length + " prompts shown";
  }
  filter.addEventListener("input", apply);
  onlyDisagree.addEventListener("change", apply);

  function fragment(hash) {
    try { return decodeURIComponent(hash.slice(1)); } catch (err) { return hash.slice(1); }
  }
  // Links to a row open its prompt (clearing a filter that hides it) and flash the row.
  function reveal(id) {
    var el = id && document.getElementById(id);
    if (!el) return false;
    var d = el.closest("details.cmp-prompt");
    if (d && d.hidden) { filter.value = ""; onlyDisagree.checked = false; apply(); }
    for (var p = el.parentElement; p; p = p.parentElement) {
      if (p.tagName === "DETAILS") p.open = true;
    }
    var old = document.querySelectorAll(".flash");
    for (var i = 0; i < old.length; i++) old[i].classList.remove("flash");
    el.classList.add("flash");
    return el;
  }
  document.addEventListener("click", function (e) {
    var a = e.target && e.target.closest ? e.target.closest("a") : null;
    if (!a) return;
    var href = a.getAttribute("href") || "";
    if (href.charAt(0) !== "#" || href.length < 2) return;
    var el = reveal(fragment(href));
    if (el && location.hash === href) { e.preventDefault(); el.scrollIntoView({block: "center"}); }
  });
  window.addEventListener("hashchange", function () {
    var el = reveal(fragment(location.hash));
    if (el) el.scrollIntoView({block: "center"});
  });
  if (location.hash.length > 1) {
    var first = reveal(fragment(location.hash));
    if (first) first.scrollIntoView({block: "center"});
  }
  Array.prototype.forEach.call(document.querySelectorAll("svg.chart .legend-item[data-series]"), function (item) {
    item.addEventListener("click", function () {
      var name = item.getAttribute("data-series"), svg = item.closest("svg");
      var off = !item.classList.contains("off");
      item.classList.toggle("off", off);
      Array.prototype.forEach.call(svg.querySelectorAll("g.series"), function (g) {
        if (g.getAttribute("data-series") === name) g.classList.toggle("off", off);
      });
    });
  });
  apply();
  body.dataset.ready = "1";
})();
