"""``python -m softmaxkit``: the same as the ``softmaxkit`` command."""

from .cli import main

if __name__ == "__main__":
    main()
