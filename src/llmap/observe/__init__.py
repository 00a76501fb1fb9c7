"""Seeing a run: progress, metrics, logs, status, reports, the HTML report and estimates."""
