"""Adapter methods, one module each.

* `base`: the `Method` interface, the placement fields every method shares,
  and the rank/alpha checks; its docstring defines a custom method end to end.
* `lora`: `LoRA` and `lorify`.
* `ia3`: `IA3` and `ia3`.
* `dora`: `DoRA` and `dora`.
* `bank`: `Bank`, `stack_adapters` and `route` (K LoRA adapters, routed per
  example).
* `routing`: how a bank routes each example (gather, one-hot, grouped by
  adapter, sorted segments) and the ``auto`` rule.
* `scaling`: scaling a weight by a vector in factored form (IA3, DoRA).
"""
