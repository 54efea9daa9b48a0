"""Contracts shared by every OPAL deployable: event schemas (Avro + pydantic), their
serialisation, category aspect schemas, settings and typed errors.

Imports only pydantic, pydantic-settings, fastavro and the standard library, so the
stream image (no torch) and the model image (no faust) can both use it.
"""
