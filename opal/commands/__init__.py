"""The `opal` command modules: one per command group, registered by :mod:`opal.cli`; shared helpers in :mod:`opal.commands.common`."""
