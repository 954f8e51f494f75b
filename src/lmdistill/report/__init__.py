"""Reports: Markdown tables and matplotlib figures (:mod:`~lmdistill.report.plots`), the demo's comparison
(:mod:`~lmdistill.report.demo`) and the same table and curves for any run directories
(:mod:`~lmdistill.report.runs`, ``lmdistill report``)."""
