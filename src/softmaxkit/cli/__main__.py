"""``python -m softmaxkit.cli``: the same as the ``softmaxkit`` command."""

from .main import main

if __name__ == "__main__":
    main()
