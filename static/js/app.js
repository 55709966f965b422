// A header checkbox with data-select-all="NAME" ticks every checkbox named NAME in its form.
document.addEventListener("change", (event) => {
  const box = event.target;
  if (!(box instanceof HTMLInputElement) || !box.dataset.selectAll) return;
  const scope = box.form || document;
  scope.querySelectorAll(`input[type=checkbox][name="${box.dataset.selectAll}"]`).forEach((other) => {
    other.checked = box.checked;
  });
});
