"""The queue: from a producer's message to a recorded outcome.

The inbox and admission (any producer's message becomes a job), the per-account ready sets and
the dispatcher that takes them in groups, the attempt policy (:mod:`worker.queue.pipeline.attempts`),
the one delivery pipeline (:mod:`worker.queue.pipeline.delivery`), the job store, the delay queue, the
orphan sweep, liveness, the per-process event loop, the Celery app (control tasks only) and the
one module that knows kombu's internals (:mod:`worker.queue.broker.kombu_redis`).
"""
