"""Celery adapters over `eczema_batch.jobs`: the only package that imports Celery."""
