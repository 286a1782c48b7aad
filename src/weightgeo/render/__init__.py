"""How results are shown: table cells, terminal tables, layer × module grids, figure panels, SVG and HTML pages.

Everything here reads reports (anything with ``rows``, ``summary`` and ``meta``) and writes text; nothing here
measures. :mod:`weightgeo.report` (``Report.to_html``, ``_repr_html_``, ``table``), :mod:`weightgeo.plot`
(matplotlib) and the command line draw through it, so the page, the notebook, the figure file and the terminal
show the same panels with the same words.
"""
