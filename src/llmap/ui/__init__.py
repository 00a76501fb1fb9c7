"""The live page (``llmap ui JOB``, ``llmap run --ui``): watch, review and steer a job in the browser.

- :mod:`llmap.ui.server`: the aiohttp application, its safety (token, anti-CSRF, Host check) and how it is served;
- :mod:`llmap.ui.routes`: the page's HTTP routes (HTML, JSON, server-sent events, actions);
- :mod:`llmap.ui.index`: the page's index of the ledger's rows (a SQLite file beside the ledger, with FTS5);
- :mod:`llmap.ui.queries`: rows pages, filters and sorts, as SQL over that index (or the ledger while it builds);
- :mod:`llmap.ui.live`: the live figures (rows by status and group, rate, ETA, cost, 429s, latency, errors);
- :mod:`llmap.ui.detail`: one row: its rendered prompt, every attempt, cache and pack, labels;
- :mod:`llmap.ui.quality`: labels, the review sample and eval's figures, when the ledger has a labels table;
- :mod:`llmap.ui.actions`: stop the run, re-queue rows, roll back a run.

The page itself is plain HTML, CSS and JavaScript in ``static/``, served by llmap: no CDN, no download.
"""
