"""Celery task definitions: thin wrappers that parse ids, open resources and call into ``farm``."""
