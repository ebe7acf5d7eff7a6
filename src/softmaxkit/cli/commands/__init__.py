"""The sub-commands of ``softmaxkit``, one module each (listed in :data:`softmaxkit.cli.main.COMMANDS`)."""
