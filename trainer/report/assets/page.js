// What the run report and the comparison page share, inlined before their own script: the box
// of earlier JS errors, links to a row that open everything around it (clearing a filter that
// hides it) and flash it, and chart legends that hide or show a series.
window.reportPage = function (holderSelector, clearFilters) {
  "use strict";
  var box = document.getElementById("js-errors");
  if (box && window.__reportErrors && window.__reportErrors.length) {
    box.hidden = false; box.textContent = window.__reportErrors.join("\n") + "\n";
  }

  function fragment(hash) {
    try { return decodeURIComponent(hash.slice(1)); } catch (err) { return hash.slice(1); }
  }

  function reveal(id) {
    var el = id && document.getElementById(id);
    if (!el) return false;
    var holder = el.closest(holderSelector);
    if (holder && holder.hidden) clearFilters();
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
    // native fragment navigation then scrolls to the (now visible) row; do it too when the
    // hash already points there and the browser would not scroll again
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
  return {fragment: fragment};
};
