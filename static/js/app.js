// A header checkbox with data-select-all="NAME" ticks every checkbox named NAME in its form.
document.addEventListener("change", (event) => {
  const box = event.target;
  if (!(box instanceof HTMLInputElement) || !box.dataset.selectAll) return;
  const scope = box.form || document;
  scope.querySelectorAll(`input[type=checkbox][name="${box.dataset.selectAll}"]`).forEach((other) => {
    other.checked = box.checked;
  });
});

// A progress bar's width comes from data-percent: the Content-Security-Policy refuses inline
// style attributes, not styles set from a script. Run on the first page and on every swap.
function showProgress(root) {
  root.querySelectorAll(".progress .bar[data-percent]").forEach((bar) => {
    bar.style.width = `${Math.max(0, Math.min(100, Number(bar.dataset.percent) || 0))}%`;
  });
}
document.addEventListener("DOMContentLoaded", () => showProgress(document));
document.addEventListener("htmx:load", (event) => showProgress(event.target));
