"""Floor 6 — reading a result store into tallies, tables, markdown, HTML and figures."""
