"""`python -m pix2pix_client` runs the CLI."""

import sys

from pix2pix_client.cli import main

sys.exit(main())
