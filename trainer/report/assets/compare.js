(function () {
  "use strict";
  var body = document.body;
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

  window.reportPage("details.cmp-prompt", function () {
    filter.value = ""; onlyDisagree.checked = false; apply();
  });
  apply();
  body.dataset.ready = "1";
})();
