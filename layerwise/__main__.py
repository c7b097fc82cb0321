"""`python -m layerwise …`: what `torchrun -m layerwise` and `accelerate launch -m layerwise` run."""

import sys

from .cli import main

sys.exit(main())
