"""OPAL tests: one folder per product package (schemas, inference, topology, workers, training, opal), bench/ for the
bench scripts, project/ for repository-wide checks. Helpers in support.py, fixtures in conftest.py."""
