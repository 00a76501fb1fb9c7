"""Is it right? Labels, evaluation with intervals, per-row confidence, cross-field checks, review samples.

- :mod:`llmap.quality.checks`: ``[output] checks``, DuckDB rules over a row's input and answer;
- :mod:`llmap.quality.confidence`: ``_confidence`` from token log-probabilities;
- :mod:`llmap.quality.labels`: label files and ``[eval] gold`` into true answers;
- :mod:`llmap.quality.metrics`: accuracy, precision, recall, F1, MAE, Wilson intervals, calibration (pure);
- :mod:`llmap.quality.eval`: ``llmap eval``, the answers against the labels;
- :mod:`llmap.quality.compare`: ``llmap eval --models``, one labelled sample through several models;
- :mod:`llmap.quality.review`: ``llmap review``, seeded and stratified samples to label.
"""
