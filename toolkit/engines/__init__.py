"""Training engines: one interface (`base.Engine`), one spec per backend (`spec.EngineSpec`).

Importing this package registers every engine (hf, deepspeed, megatron); callers look them up by
the recipe's `engine:` name through `toolkit.engines.spec`, never by importing a backend.
"""

from toolkit.engines import deepspeed_zero, hf  # noqa: F401  (register "deepspeed" and "hf")
from toolkit.engines.megatron import spec as megatron_spec  # noqa: F401  (registers "megatron")
