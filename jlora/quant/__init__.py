"""Quantized frozen weights (QLoRA): int8, int4, NF4, and GGUF blocks as shipped.

`jlora.quantize` turns chosen float weights of a tree into `Quantized`
leaves, pytrees of packed codes and scales; `jlora.dequantize` turns them
back. `from_gguf` / `read_gguf` keep a GGUF file's tensors in their blocks.

>>> import jax, jax.numpy as jnp, jlora
>>> params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (64, 16))}}
>>> q = jlora.quantize(params, "nf4")
>>> w, back = params["dense"]["kernel"], jlora.dequantize(q)["dense"]["kernel"]
>>> bool(jnp.max(jnp.abs(back - w)) <= 0.2 * jnp.max(jnp.abs(w)))
True
"""

from jlora.quant._array import Quantized as Quantized
from jlora.quant._array import is_quantized as is_quantized
from jlora.quant._formats import FORMATS as FORMATS
from jlora.quant._formats import NF4 as NF4
from jlora.quant._gguf import from_gguf as from_gguf
from jlora.quant._gguf import read_gguf as read_gguf
from jlora.quant._transform import dequantize as dequantize
from jlora.quant._transform import quantize as quantize
