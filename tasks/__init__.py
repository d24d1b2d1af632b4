"""Thin Celery tasks: parse ids, call worker.runtime.service, enqueue follow-ups after commit."""
