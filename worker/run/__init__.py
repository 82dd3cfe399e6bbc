"""Running Postroom's processes.

The supervisor of ``postroom up``, the worker group of ``postroom worker`` (one Celery
process per core), the embedded Redis, and the development mail catcher.
"""
