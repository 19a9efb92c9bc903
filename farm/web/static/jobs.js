// The jobs page: "select all" ticks every job on the page.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const all = document.getElementById("select-all");
  if (!all) return;
  all.addEventListener("change", () => {
    for (const box of document.querySelectorAll('input[name="job"]')) box.checked = all.checked;
  });
});
