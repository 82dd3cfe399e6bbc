"""The broker: the Celery app, kombu's internals, what differs per broker, and the intake."""
