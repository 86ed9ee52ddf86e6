"""``python -m gateway.cli``: the ``oauth-gateway`` command."""

import sys

from gateway.cli.commands import main

sys.exit(main())
