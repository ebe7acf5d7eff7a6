"""``python -m softmaxkit.cli``: the same as the ``softmaxkit`` command."""

from . import main

if __name__ == "__main__":
    main()
