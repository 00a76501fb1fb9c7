"""The ledger's SQLite schema, as named migrations applied in order (:mod:`llmap.store.migrate`).

Tables: ``rows`` (one per input row: state, answer, usage, confidence, the
last raw answer of a failed row), ``runs`` (one per run: totals, per-model
usage, exit reason, models, the hash of prompt and fields, rollback),
``attempts`` (every model answer on a row's way: cascade steps, re-asks),
``requests`` (one per request sent: time, model, outcome, latency, tokens,
prompt-cache reads and writes, pack size), ``row_history`` (each row's state
before a run changed it: :mod:`llmap.store.history`), ``labels`` (the true
answers a person gave: :mod:`llmap.store.labels`), ``cascade_rows`` and
``cascade_decisions`` (a cascade with a guarantee: :mod:`llmap.store.cascade`),
``meta``, and the operators' tables (``op_*``, :mod:`llmap.store.operators`). A
migration once released is never edited: a later change is a new entry at the end.
"""

from __future__ import annotations

__all__ = ["MIGRATIONS"]

MIGRATIONS: list[tuple[str, str]] = [
    (
        "001_rows_runs_meta",
        """
        CREATE TABLE rows (
            key TEXT PRIMARY KEY,
            seq INTEGER NOT NULL,
            plan INTEGER NOT NULL,
            input_hash TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('pending', 'done', 'failed', 'skipped')),
            attempts INTEGER NOT NULL DEFAULT 0,
            data TEXT NOT NULL,
            output TEXT,
            prompt_tokens INTEGER,
            completion_tokens INTEGER,
            latency_s REAL,
            model TEXT,
            error TEXT,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        );
        CREATE INDEX rows_plan_status_seq ON rows (plan, status, seq);
        CREATE INDEX rows_plan_seq ON rows (plan, seq);
        CREATE TABLE runs (
            id INTEGER PRIMARY KEY,
            started_at REAL NOT NULL,
            ended_at REAL,
            spec_hash TEXT NOT NULL,
            rows_total INTEGER,
            done INTEGER,
            failed INTEGER,
            skipped INTEGER,
            pending INTEGER,
            requests INTEGER,
            prompt_tokens INTEGER,
            completion_tokens INTEGER,
            exit_reason TEXT
        );
        CREATE TABLE meta (k TEXT PRIMARY KEY, v BLOB);
        """,
    ),
    (
        # SQLite cannot alter a CHECK constraint: rebuild the table to admit 'fallback'.
        "002_status_fallback",
        """
        CREATE TABLE rows_new (
            key TEXT PRIMARY KEY,
            seq INTEGER NOT NULL,
            plan INTEGER NOT NULL,
            input_hash TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('pending', 'done', 'failed', 'skipped', 'fallback')),
            attempts INTEGER NOT NULL DEFAULT 0,
            data TEXT NOT NULL,
            output TEXT,
            prompt_tokens INTEGER,
            completion_tokens INTEGER,
            latency_s REAL,
            model TEXT,
            error TEXT,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        );
        INSERT INTO rows_new SELECT * FROM rows;
        DROP TABLE rows;
        ALTER TABLE rows_new RENAME TO rows;
        CREATE INDEX rows_plan_status_seq ON rows (plan, status, seq);
        CREATE INDEX rows_plan_seq ON rows (plan, seq);
        ALTER TABLE runs ADD COLUMN fallback INTEGER;
        ALTER TABLE runs ADD COLUMN cost_usd REAL;
        ALTER TABLE runs ADD COLUMN rate_limited INTEGER;
        ALTER TABLE runs ADD COLUMN retries INTEGER;
        """,
    ),
    (
        "003_source_truncated_attempts",
        """
        ALTER TABLE rows ADD COLUMN source TEXT;
        ALTER TABLE rows ADD COLUMN truncated TEXT;
        CREATE TABLE attempts (
            id INTEGER PRIMARY KEY,
            run INTEGER NOT NULL,
            key TEXT NOT NULL,
            model TEXT,
            outcome TEXT NOT NULL,
            output TEXT,
            prompt_tokens INTEGER,
            completion_tokens INTEGER,
            created_at REAL NOT NULL
        );
        CREATE INDEX attempts_key ON attempts (key);
        """,
    ),
    (
        "004_request_log_run_details",
        """
        CREATE TABLE requests (
            id INTEGER PRIMARY KEY,
            run INTEGER NOT NULL,
            t REAL NOT NULL,
            model TEXT NOT NULL,
            outcome TEXT NOT NULL,
            latency_s REAL,
            prompt_tokens INTEGER,
            completion_tokens INTEGER,
            pack_size INTEGER NOT NULL DEFAULT 1
        );
        CREATE INDEX requests_run_t ON requests (run, t);
        ALTER TABLE runs ADD COLUMN cached INTEGER;
        ALTER TABLE runs ADD COLUMN by_model TEXT;
        """,
    ),
    (
        # Prompt caching: the tokens each request read from / wrote to the provider's prompt cache.
        "005_prompt_cache_tokens",
        """
        ALTER TABLE requests ADD COLUMN cache_read_tokens INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE requests ADD COLUMN cache_write_tokens INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE runs ADD COLUMN cache_read_tokens INTEGER;
        ALTER TABLE runs ADD COLUMN cache_write_tokens INTEGER;
        """,
    ),
    (
        # Batch APIs (llmap.run.batch.runner): each batch's intent before it is created, the provider's id once
        # known, its lines (custom id -> the rows it answers); each request's path ('batch' or real time) and cost.
        "006_batches",
        """
        CREATE TABLE batches (
            id INTEGER PRIMARY KEY,
            run INTEGER NOT NULL,
            model TEXT NOT NULL,
            provider TEXT NOT NULL,
            tag TEXT NOT NULL UNIQUE,
            file_hash TEXT NOT NULL,
            requests INTEGER NOT NULL,
            bytes INTEGER NOT NULL,
            tokens INTEGER NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('intent', 'open', 'collected', 'dropped')),
            provider_id TEXT,
            input_file_id TEXT,
            status TEXT,
            counts TEXT,
            error TEXT,
            cancel TEXT,
            created_at REAL NOT NULL,
            submitted_at REAL,
            seen_at REAL,
            ended_at REAL
        );
        CREATE INDEX batches_state ON batches (state);
        CREATE TABLE batch_lines (
            batch INTEGER NOT NULL,
            custom_id TEXT NOT NULL,
            item TEXT NOT NULL,
            key TEXT NOT NULL,
            ckey TEXT,
            input_hash TEXT,
            PRIMARY KEY (custom_id, key)
        );
        CREATE INDEX batch_lines_key ON batch_lines (key);
        CREATE INDEX batch_lines_batch ON batch_lines (batch);
        ALTER TABLE requests ADD COLUMN cost_usd REAL;
        ALTER TABLE requests ADD COLUMN path TEXT;
        """,
    ),
    (
        # Quality (issue 19): per-row confidence and last raw answer; runs with their models, hash of prompt and
        # fields, rows settled, the plan and meta before them and a rollback stamp; each row's state before a run
        # changed it (row_history); the true answers a person gave (labels).
        "007_quality",
        """
        ALTER TABLE rows ADD COLUMN confidence REAL;
        ALTER TABLE rows ADD COLUMN raw TEXT;
        ALTER TABLE rows ADD COLUMN born INTEGER;
        ALTER TABLE runs ADD COLUMN settled INTEGER;
        ALTER TABLE runs ADD COLUMN models TEXT;
        ALTER TABLE runs ADD COLUMN prompt_hash TEXT;
        ALTER TABLE runs ADD COLUMN prev_plan INTEGER;
        ALTER TABLE runs ADD COLUMN prev_output_schema BLOB;
        ALTER TABLE runs ADD COLUMN prev_data_columns TEXT;
        ALTER TABLE runs ADD COLUMN rolled_back_at REAL;
        CREATE TABLE row_history (
            run INTEGER NOT NULL,
            key TEXT NOT NULL,
            seq INTEGER NOT NULL,
            plan INTEGER NOT NULL,
            input_hash TEXT NOT NULL,
            status TEXT NOT NULL,
            attempts INTEGER NOT NULL,
            data TEXT NOT NULL,
            output TEXT,
            prompt_tokens INTEGER,
            completion_tokens INTEGER,
            latency_s REAL,
            model TEXT,
            error TEXT,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            source TEXT,
            truncated TEXT,
            confidence REAL,
            raw TEXT,
            born INTEGER,
            PRIMARY KEY (run, key)
        );
        CREATE TABLE labels (
            key TEXT NOT NULL,
            field TEXT NOT NULL,
            value TEXT,
            source TEXT NOT NULL,
            created_at REAL NOT NULL,
            PRIMARY KEY (key, field)
        );
        """,
    ),
    (
        # A cascade with a guarantee (issue 21, :mod:`llmap.store.cascade`): each row's proxy answer and score, its
        # place in a decision's population and sample, the oracle's answer, whether the threshold keeps it; and the
        # decisions (the sample drawn, the threshold chosen, its bound, reuses by incremental runs).
        "008_cascade",
        """
        CREATE TABLE cascade_rows (
            key TEXT PRIMARY KEY,
            input_hash TEXT NOT NULL,
            proxy_status TEXT NOT NULL,
            proxy_output TEXT,
            proxy_model TEXT,
            proxy_source TEXT,
            proxy_error TEXT,
            score REAL,
            prompt_tokens INTEGER NOT NULL DEFAULT 0,
            completion_tokens INTEGER NOT NULL DEFAULT 0,
            latency_s REAL NOT NULL DEFAULT 0,
            attempts INTEGER NOT NULL DEFAULT 0,
            decision INTEGER,
            via_reuse INTEGER NOT NULL DEFAULT 0,
            sampled INTEGER NOT NULL DEFAULT 0,
            keep INTEGER,
            oracle_status TEXT,
            oracle_output TEXT,
            run INTEGER NOT NULL,
            updated_at REAL NOT NULL
        );
        CREATE INDEX cascade_rows_decision ON cascade_rows (decision, sampled, keep);
        CREATE TABLE cascade_decisions (
            id INTEGER PRIMARY KEY,
            run INTEGER NOT NULL,
            decision_key TEXT NOT NULL,
            settings TEXT NOT NULL,
            population INTEGER NOT NULL,
            sample INTEGER NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('sampling', 'decided', 'missed')),
            threshold REAL,
            choice TEXT,
            reuses TEXT NOT NULL DEFAULT '[]',
            created_at REAL NOT NULL,
            decided_at REAL
        );
        """,
    ),
    (
        # The live page (llmap.ui): its index of the rows follows the ledger by the rows that changed since it last
        # looked, found through this index instead of a scan of every row.
        "009_ui",
        """
        CREATE INDEX rows_updated_at ON rows (updated_at);
        """,
    ),
    (
        # Operators (llmap.operators, llmap.store.operators): every model step's outcome, content-addressed by its
        # request's key (a crash resumes mid-operator without repeating a call); embeddings; cluster families; reduce
        # groups and their chunks; each run's operator summary.
        "010_operators",
        """
        CREATE TABLE op_steps (
            key TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            run INTEGER NOT NULL,
            output TEXT NOT NULL,
            model TEXT,
            source TEXT,
            prompt_tokens INTEGER NOT NULL DEFAULT 0,
            completion_tokens INTEGER NOT NULL DEFAULT 0,
            created_at REAL NOT NULL
        );
        CREATE TABLE op_vectors (
            key TEXT PRIMARY KEY,
            model TEXT NOT NULL,
            dim INTEGER NOT NULL,
            vec BLOB NOT NULL
        );
        CREATE TABLE op_families (
            id TEXT PRIMARY KEY,
            run INTEGER NOT NULL,
            name TEXT NOT NULL,
            description TEXT NOT NULL,
            size INTEGER NOT NULL,
            examples TEXT NOT NULL,
            sources TEXT NOT NULL,
            created_at REAL NOT NULL
        );
        CREATE TABLE op_groups (
            key TEXT PRIMARY KEY,
            seq INTEGER NOT NULL,
            plan INTEGER NOT NULL,
            data TEXT NOT NULL,
            status TEXT NOT NULL,
            output TEXT,
            error TEXT,
            model TEXT,
            source TEXT,
            fingerprint TEXT NOT NULL
        );
        CREATE INDEX op_groups_plan_seq ON op_groups (plan, seq);
        CREATE TABLE op_chunks (
            grp TEXT NOT NULL,
            level INTEGER NOT NULL,
            idx INTEGER NOT NULL,
            step TEXT NOT NULL,
            members TEXT NOT NULL,
            PRIMARY KEY (grp, level, idx)
        );
        CREATE TABLE op_runs (
            run INTEGER PRIMARY KEY,
            kind TEXT NOT NULL,
            summary TEXT NOT NULL
        );
        """,
    ),
]
