"""OPAL application package: the `opal` CLI (the only module that wires every layer
together) and the embedded single-machine stack."""

__version__ = "0.1.0"
