"""Scripts run by hand for the docs: the README's figures and the screenshots of the web UIs in docs/img/."""
