"""The report stage's parts (:mod:`pipelines.report` runs them): reading the other stages' files
(``inputs``), tables, figures, findings and REPORT.md (``markdown``). None of them computes a model result."""
