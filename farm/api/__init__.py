"""The farm API: the front door people and their scripts use (``farm api``).

Workers, the scheduler and beat are trusted services with direct access to the database, broker
and bucket; everyone else holds an API token and nothing more. :func:`farm.api.app.create_api`
builds the FastAPI application; routes live one module per concept (:mod:`farm.api.jobs`,
:mod:`farm.api.inputs`, :mod:`farm.api.events`, :mod:`farm.api.bulk`, :mod:`farm.api.service`);
who may do what is decided by :mod:`storage.access` only.
"""
