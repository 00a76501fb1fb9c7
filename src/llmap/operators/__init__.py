"""Operators: what a job does with its rows beyond one answer per row (``kind`` in the job spec).

``map`` (the default) answers each row. The operators are built from the same
pieces: windows, pairs or groups of rows become requests (:mod:`~llmap.operators.steps`),
the job's dispatcher sends them, the settle stage judges them, and the ledger keeps
every step, so a crash resumes mid-operator without repeating a call.

=========== ===================================================== ===============================
kind        what it does                                          output
=========== ===================================================== ===============================
``cluster`` rows into families the model names and describes      ``_family`` and a families table
``resolve`` rows that mean the same entity, by blocking + judging ``_entity``
``reduce``  one answer per group of rows, hierarchical if large   one row per group
``filter``  keep the rows whose boolean field is true             only those rows
=========== ===================================================== ===============================

The engine reaches them through :mod:`llmap.operators.runner` only.
"""
