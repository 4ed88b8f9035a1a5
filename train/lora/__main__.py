"""`python -m vlm2vla_edge.train.lora` and `accelerate launch -m vlm2vla_edge.train.lora`.

The same options as `vlm2vla-edge train`.
"""

import sys

from vlm2vla_edge.train.lora.cli import main

sys.exit(main())
