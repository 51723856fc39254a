"""The report card: one page (Markdown and HTML, with plots) about a run, from its data to its safety numbers."""
