"""The numbering worker: Celery app, task, consumer and start-up.

This folder is the design card's top-level ``tasks/``; it is installed as
``numbering.tasks`` so that it never shadows an application's own ``tasks`` module.
"""
