"""Executing a job: the worker pool, the dispatcher, packs and run accounting."""
