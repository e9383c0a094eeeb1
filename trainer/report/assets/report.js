(function () {
  "use strict";
  var body = document.body;
  var timelines = Array.prototype.slice.call(document.querySelectorAll("details.timeline"));
  var texts = timelines.map(function (d) {
    var p = d.querySelector(".prompt-text"), r = d.querySelector(".reference-text");
    return ((p ? p.textContent : "") + "\n" + (r ? r.textContent : "") + "\n" + (d.getAttribute("data-prompt-id") || "")).toLowerCase();
  });
  var filter = document.getElementById("prompt-filter");
  var onlyAlerts = document.getElementById("only-alerts");
  var count = document.getElementById("visible-count");

  function apply() {
    var q = filter.value.trim().toLowerCase(), only = onlyAlerts.checked, shown = 0;
    timelines.forEach(function (d, i) {
      var ok = (!q || texts[i].indexOf(q) !== -1) && (!only || Number(d.getAttribute("data-alerts")) > 0);
      d.hidden = !ok;
      if (ok) shown++;
    });
    count.textContent = shown + " of " + timelines.length + " prompts shown";
  }
  filter.addEventListener("input", apply);
  onlyAlerts.addEventListener("change", apply);
  document.getElementById("expand-all").addEventListener("click", function () {
    timelines.forEach(function (d) { if (!d.hidden) d.open = true; });
  });
  document.getElementById("collapse-all").addEventListener("click", function () {
    timelines.forEach(function (d) { d.open = false; });
  });
  var diff = document.getElementById("show-diff");
  diff.addEventListener("change", function () { body.classList.toggle("no-diff", !diff.checked); });

  var fragment = window.reportPage("details.timeline", function () {
    filter.value = ""; onlyAlerts.checked = false; apply();
  }).fragment;

  // The grid: hovering a cell shows the generation of the timeline row it links to (the page
  // holds each text once); clicking it is an ordinary link, which page.js opens.
  var grid = document.getElementById("grid"), tip = document.getElementById("grid-tip");
  function cellText(cell) {
    var row = document.getElementById(fragment(cell.getAttribute("href")));
    if (!row) return null;
    if (!row.querySelector(".gen")) return {head: "all prompts", text: row.textContent.trim()};  // an event-wide alert
    var gen = row.querySelector(".gen").cloneNode(true);
    Array.prototype.forEach.call(gen.querySelectorAll("del"), function (d) { d.remove(); });
    var t = row.closest("details.timeline"), num = t ? t.querySelector(".pnum").textContent : "";
    var stage = row.querySelector(".stage").firstChild.textContent;
    var signals = Array.prototype.map.call(row.querySelectorAll(".signals > span"), function (x) { return x.textContent; });
    // a removed word leaves the spaces on both sides of it: one is enough
    return {head: [num, "step " + row.getAttribute("data-step"), stage].concat(signals).join(" · "),
            text: gen.textContent.replace(/ {2,}/g, " ")};
  }
  if (grid && tip) {
    grid.addEventListener("mouseover", function (e) {
      var cell = e.target.closest ? e.target.closest("a.c") : null;
      var info = cell && cellText(cell);
      if (!info) { tip.hidden = true; return; }
      tip.textContent = "";
      var head = document.createElement("b");
      head.textContent = info.head;
      tip.appendChild(head);
      tip.appendChild(document.createTextNode("\n" + info.text));
      tip.hidden = false;
      var box = cell.getBoundingClientRect();
      tip.style.left = Math.max(4, Math.min(box.left, window.innerWidth - 530)) + "px";
      tip.style.top = (box.bottom + 6) + "px";
    });
    grid.addEventListener("mouseleave", function () { tip.hidden = true; });
  }

  // The grid's colouring: each cell holds its class for every choice of the selector.
  var gridMetric = document.getElementById("grid-metric");
  if (gridMetric && grid) {
    gridMetric.addEventListener("change", function () {
      var i = gridMetric.selectedIndex;
      Array.prototype.forEach.call(grid.querySelectorAll("a.c[data-cls]"), function (cell) {
        var alert = cell.classList.contains("al");
        cell.className = "c " + cell.getAttribute("data-cls").split("|")[i] + (alert ? " al" : "");
      });
    });
  }

  apply();
  body.dataset.ready = "1";
})();
