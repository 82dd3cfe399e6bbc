"""The queue: from a Celery message to a recorded outcome.

The Celery app and its thin tasks, the attempt policy (:mod:`worker.queue.attempts`), the
one delivery pipeline (:mod:`worker.queue.delivery`), the job store, the delay queue,
coalescing (drain), the orphan sweep, liveness, the per-process event loop, and the one
module that knows kombu's internals (:mod:`worker.queue.broker`).
"""
