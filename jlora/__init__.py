"""jlora: LoRA for JAX and Flax as a pure transform of a parameter tree.

>>> import jax, jax.numpy as jnp, jlora
>>> params = {"dense": {"kernel": jnp.ones((8, 8)), "bias": jnp.zeros(8)}}
>>> lorified = jlora.lorify(params, 2, key=jax.random.key(0))
>>> y = jlora.lora(lambda p, x: x @ p["dense"]["kernel"])(lorified, jnp.ones(8))
>>> y.shape
(8,)
"""

from jlora._checkpoint import Checkpoints as Checkpoints
from jlora._checkpoint import load_adapters as load_adapters
from jlora._checkpoint import save_adapters as save_adapters
from jlora._errors import LoraError as LoraError
from jlora._lora import LoRA as LoRA
from jlora._lorify import lorify as lorify
from jlora._merge import merge as merge
from jlora._method import Method as Method
from jlora._optim import combine as combine
from jlora._optim import freeze as freeze
from jlora._optim import partition as partition
from jlora._optim import trainable_mask as trainable_mask
from jlora._runtime import FactoredFallbackWarning as FactoredFallbackWarning
from jlora._runtime import lora as lora
from jlora._structure import FullyTrainable as FullyTrainable
from jlora._summary import Summary as Summary
from jlora._summary import summary as summary
from jlora._targets import Axes as Axes
from jlora._train import TrainState as TrainState
from jlora._train import TrainStep as TrainStep
from jlora._train import train_step as train_step

__version__ = "0.1.0"
