"""PEFT files: adapters as Hugging Face PEFT writes and reads them.

A PEFT adapter directory holds ``adapter_config.json`` and
``adapter_model.safetensors``, whose tensors are named
``base_model.model.<torch module>.<tensor>`` in torch's layout:

* LoRA (``LoraConfig``, ``peft_type: "LORA"``): ``lora_A.weight`` ``(r, in)``
  and ``lora_B.weight`` ``(out, r)``, i.e. ``Aᵀ`` and ``Bᵀ`` of jlora's
  ``(in, r)`` / ``(r, out)``; on an embedding ``lora_embedding_A``
  ``(r, vocab)`` and ``lora_embedding_B`` ``(features, r)``.
* DoRA (``"LORA"`` with ``use_dora: true``): the same plus
  ``lora_magnitude_vector`` ``(out,)``, jlora's ``dora_m``.
* IA3 (``IA3Config``, ``peft_type: "IA3"``): ``ia3_l`` ``(out, 1)``, or
  ``(1, in)`` for the modules in ``feedforward_modules``. PEFT also scales the
  bias of an output-side module, jlora does not (see `jlora.IA3`).
* ``modules_to_save``: whole parameters (``<module>.weight``, ``.bias``),
  jlora's leaves trained in full (``trainable=``).

Each method writes and reads its own tensors through its PEFT hooks
(`jlora.Method.peft_tensors`, ``from_peft``, ``peft_config``, ``peft_fuse``,
``peft_split``); this package does the naming, the layouts and the files.

Which jlora weight is which torch module is a `ModuleMap`: an ordered list of
`Rule`\\ s, ``(tree template, torch template, layout)``. Multi-axis kernels
(``(d, heads, head_dim)``) are flattened to ``(in, out)``; a `Conv1D` layout
(GPT-2) keeps torch's ``(in, out)`` weight and sets ``fan_in_fan_out``; a
fused part (``Linear(part=1, parts=3)``) puts separate q, k, v weights into
one ``qkv_proj``, exactly (LoRA as one adapter of the summed rank, DoRA and
output-side IA3 per slice), or the export refuses and says why. Ready-made
maps are in `jlora.peft.maps`.

>>> import jax, jax.numpy as jnp, jlora, tempfile
>>> from jlora.peft import maps
>>> base = {"model": {"layers_0": {"self_attn": {
...     p: {"kernel": jnp.ones((8, 8))} for p in ("q_proj", "v_proj")}}}}
>>> p = jlora.lorify(base, 2, key=jax.random.key(0), targets=("q_proj", "v_proj"))
>>> config = jlora.export_peft(p, tempfile.mkdtemp(), module_path=maps.LLAMA)
>>> config["target_modules"], config["task_type"]
(['model.layers.0.self_attn.q_proj', 'model.layers.0.self_attn.v_proj'], 'CAUSAL_LM')
"""

from jlora.peft._map import Conv1D as Conv1D
from jlora.peft._map import Embedding as Embedding
from jlora.peft._map import Layout as Layout
from jlora.peft._map import Linear as Linear
from jlora.peft._map import ModuleMap as ModuleMap
from jlora.peft._map import Rule as Rule
from jlora.peft._map import Target as Target
from jlora.peft._export import export_peft as export_peft
from jlora.peft._import import import_peft as import_peft
from jlora.peft import maps as maps

__all__ = ("Conv1D", "Embedding", "Layout", "Linear", "ModuleMap", "Rule", "Target",
           "export_peft", "import_peft", "maps")
