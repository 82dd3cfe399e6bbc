// Postroom dashboard: ask before a form marked data-confirm (purge) is sent. Nothing else.
"use strict";
document.addEventListener("submit", (event) => {
  const question = event.target.getAttribute("data-confirm");
  if (question && !window.confirm(question)) {
    event.preventDefault();
  }
});
