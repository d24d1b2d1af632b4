"""Thin Celery tasks: parse ids, call worker.service, enqueue follow-ups after commit."""
