"""jlora: LoRA for JAX and Flax as a pure transform of a parameter tree.

>>> import jax, jax.numpy as jnp, jlora
>>> params = {"dense": {"kernel": jnp.ones((8, 8)), "bias": jnp.zeros(8)}}
>>> lorified = jlora.lorify(params, 2, key=jax.random.key(0))
>>> y = jlora.lora(lambda p, x: x @ p["dense"]["kernel"])(lorified, jnp.ones(8))
>>> y.shape
(8,)
"""

# Adding adapters: one entry point per method, and the engine they share.
from jlora._add import add_adapters as add_adapters
from jlora.methods.base import Method as Method
from jlora.methods.lora import LoRA as LoRA
from jlora.methods.lora import lorify as lorify
from jlora.methods.ia3 import IA3 as IA3
from jlora.methods.ia3 import ia3 as ia3
from jlora.methods.dora import DoRA as DoRA
from jlora.methods.dora import dora as dora
from jlora.methods.bank import Bank as Bank
from jlora.methods.bank import route as route
from jlora.methods.bank import stack_adapters as stack_adapters
from jlora._targets import Axes as Axes
from jlora._infer import infer_axes as infer_axes
from jlora._structure import FullyTrainable as FullyTrainable
# Running, merging, inspecting.
from jlora._runtime import FactoredFallbackWarning as FactoredFallbackWarning
from jlora._runtime import lora as lora
from jlora._merge import merge as merge
# Quantized frozen weights (QLoRA): int8, int4, NF4, GGUF blocks.
from jlora import quant as quant
from jlora.quant import Quantized as Quantized
from jlora.quant import dequantize as dequantize
from jlora.quant import quantize as quantize
from jlora._summary import Summary as Summary
from jlora._summary import summary as summary
# Named adapters.
from jlora._named import adapter_names as adapter_names
from jlora._named import disable as disable
from jlora._named import select as select
from jlora._named import ties as ties
from jlora._named import weighted_adapter as weighted_adapter
# Optimizers and training.
from jlora._optim import adapters_only as adapters_only
from jlora._optim import combine as combine
from jlora._optim import freeze as freeze
from jlora._optim import frozen_mask as frozen_mask
from jlora._optim import partition as partition
from jlora._optim import trainable_mask as trainable_mask
from jlora._train import TrainState as TrainState
from jlora._train import TrainStep as TrainStep
from jlora._train import train_step as train_step
# Files.
from jlora._checkpoint import Checkpoints as Checkpoints
from jlora._checkpoint import load_adapters as load_adapters
from jlora._checkpoint import save_adapters as save_adapters
from jlora import peft as peft  # ModuleMap, Rule, layouts, maps
from jlora.peft import export_peft as export_peft
from jlora.peft import import_peft as import_peft
from jlora._errors import LoraError as LoraError

__all__ = (
    "Axes", "Bank", "Checkpoints", "DoRA", "FactoredFallbackWarning",
    "FullyTrainable", "IA3", "LoRA", "LoraError", "Method", "Summary",
    "TrainState", "TrainStep", "adapter_names", "adapters_only", "add_adapters",
    "combine", "disable", "dora", "export_peft", "freeze", "frozen_mask", "ia3",
    "import_peft", "infer_axes", "load_adapters", "lora", "lorify", "merge", "partition",
    "route", "save_adapters", "select", "stack_adapters", "summary", "ties",
    "train_step", "trainable_mask", "weighted_adapter",
    "Quantized", "dequantize", "quant", "quantize", "peft",
)

__version__ = "0.1.0"
