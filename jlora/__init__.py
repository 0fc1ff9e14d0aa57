"""jlora: LoRA for JAX and Flax as a pure transform of a parameter tree.

>>> import jax, jax.numpy as jnp, jlora
>>> params = {"dense": {"kernel": jnp.ones((8, 8)), "bias": jnp.zeros(8)}}
>>> lorified = jlora.lorify(params, 2, key=jax.random.key(0))
>>> y = jlora.lora(lambda p, x: x @ p["dense"]["kernel"])(lorified, jnp.ones(8))
>>> y.shape
(8,)
"""

from jlora._bank import Bank as Bank
from jlora._bank import route as route
from jlora._bank import stack_adapters as stack_adapters
from jlora._checkpoint import Checkpoints as Checkpoints
from jlora._checkpoint import load_adapters as load_adapters
from jlora._checkpoint import save_adapters as save_adapters
from jlora._errors import LoraError as LoraError
from jlora._lora import LoRA as LoRA
from jlora._lorify import lorify as lorify
from jlora._merge import merge as merge
from jlora._method import Method as Method
from jlora._methods import DoRA as DoRA
from jlora._methods import IA3 as IA3
from jlora._methods import dora as dora
from jlora._methods import ia3 as ia3
from jlora._named import adapter_names as adapter_names
from jlora._named import ties as ties
from jlora._named import disable as disable
from jlora._named import select as select
from jlora._named import weighted_adapter as weighted_adapter
from jlora._optim import combine as combine
from jlora._optim import freeze as freeze
from jlora._optim import partition as partition
from jlora._optim import trainable_mask as trainable_mask
from jlora._peft import bert_module_path as bert_module_path
from jlora._peft import export_peft as export_peft
from jlora._peft import import_peft as import_peft
from jlora._peft import llama_module_path as llama_module_path
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
