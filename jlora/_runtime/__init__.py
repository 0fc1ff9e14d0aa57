"""Running unmodified model code with adapters in factored form.

`lora(fn)` traces ``fn`` on the *base* tree to a jaxpr and evaluates that
jaxpr with a small interpreter. Each adapted weight enters the interpreter as
an `jlora._adapted.Adapted` value: the frozen weight plus its adapter arrays,
every axis labelled. Shape-only operations on the weight (casts, transposes,
reshapes, slices of stacked layers) are applied to the labels and, where
needed, to the adapter arrays. Uses of the weight (``dot_general``,
``conv_general_dilated``, ``gather``) are handed to each method, which
computes its factored form (``x·W + s·(x·A)·B`` for LoRA) without forming
``A·B``. Control flow (``jit``, ``scan``, ``cond``, ``while``, ``remat``) is
re-entered with the same interpreter, so scan-stacked and rematerialised
layers stay factored.

Anything else that touches an adapted weight gets the dense effective weight
(the method's ``fold``) instead: always correct, never silent — such a use
emits a `FactoredFallbackWarning`.

The interpreter only runs while JAX traces; under ``jit`` it costs nothing per
step. It relies on public APIs only: ``jax.make_jaxpr``,
``jax.extend.core`` and ``Primitive.bind``.

Modules, one concern each:

* `context`: the per-call `Context` (dropout key, use counts, fusion flag,
  warnings already shown), passed to every rule;
* `registry`: the ``@rule("primitive")`` registry, binding and the dense
  fallback;
* `shapes`, `uses`, `control`: the rules, by kind (shape-only operations;
  dot, conv and gather; control flow);
* `fusion`: shared-input fusion of down-projections;
* `interpret`: the evaluator;
* `trace`: tracing ``fn`` on the base tree (also what `jlora.infer_axes` reads);
* `lora`: `lora` itself.
"""

from jlora._runtime import control, shapes, uses  # noqa: F401  (register the rules)
from jlora._runtime.context import FactoredFallbackWarning as FactoredFallbackWarning
from jlora._runtime.lora import lora as lora
