"""The queue: from a producer's message to a recorded outcome, in five rooms, bottom first
(each imports only from its own and the ones below; tests/test_layout.py):

- ``store/``: job records, ready sets, the delay queue, dead letters, claims and marks, and every
  Lua script that writes them;
- ``broker/``: the Celery app, kombu's internals (one module), what differs per broker, the
  inbox that turns any producer's message into a job, and the process's one ProcessState;
- ``events/``: the webhook outbox and sender;
- ``process/``: the worker process's runtime (its loop, records, pools), liveness and the sweep;
- ``pipeline/``: the dispatcher, the attempt policy and the one delivery pipeline.

On top: ``app.py`` (``celery -A worker.queue.app``), ``service.py`` (what a worker process runs
beside Celery's consumer) and ``tasks.py`` (the control tasks).
"""
