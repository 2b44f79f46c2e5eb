"""``python -m domainmix``: the ``domainmix`` command line (``domainmix.experiments.__main__.main``)."""

import sys

from domainmix.experiments.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
