"""`lora(fn)`: running unmodified model code with adapters in factored form."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jlora import _adapted, _structure
from jlora._runtime.context import Context
from jlora._runtime.interpret import evaluate
from jlora._runtime.registry import dense
from jlora._tree import is_array, is_quantized, keypath_to_path
from jlora.quant import _lazy


def _is_dynamic(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic))


def lora(fn: Callable, *, rng: jax.Array | None = None, fuse: bool = True) -> Callable:
  """Makes ``fn`` run with the adapters in a jlora tree, in factored form.

  ``fn``'s first argument is a parameter tree (anything `lorify` accepts:
  Linen variables, a pure-dict NNX state, a dict of arrays). The returned
  function takes the same arguments, except that the tree may hold adapters;
  it computes what ``fn`` would compute on `merge`\\ (tree), but as
  ``x·W + s·(x·A)·B``: it never forms ``A·B`` and never a gradient for the
  frozen ``W`` (the base weights of adapted leaves are held under
  ``stop_gradient``).

  Works under ``jit``, ``grad`` and ``vmap``, through ``nn.scan``, ``nn.remat``,
  ``lax.cond``/``while_loop``, bf16 casts, multi-axis kernels, ``Conv``,
  ``Embed`` lookups and tied-embedding ``attend``. Uses with no factored form
  run on the merged weight and warn (`FactoredFallbackWarning`), once per
  weight and primitive in each call.

  Array arguments (``jax.Array``/``numpy``) are traced; every other argument
  (flags, strings, ``rngs`` dicts of keys are arrays) is passed through as a
  static Python value.

  Adapter dropout (``LoRA(dropout=p)``, PEFT's ``lora_dropout``) is active
  only when ``rng`` is given: build the wrapper inside the training step with
  that step's key, ``jlora.lora(apply, rng=step_key)(params, x)``. Each use of
  each weight (each layer of a scanned stack, each iteration of a while loop)
  draws its own mask from ``rng``; without ``rng`` (evaluation) the adapter
  path is deterministic.

  Args:
    fn: a function whose first positional argument is the parameter tree.
    rng: a PRNG key for adapter dropout, or None for none.
    fuse: compute the down-projections ``x·A`` of weights that share their
      input (q, k, v; gate, up) as one matmul. The result is the same up to
      float rounding; ``False`` gives one skinny matmul per weight.

  Returns:
    A function with ``fn``'s signature that accepts a jlora tree.

  Raises:
    LoraError: ``fn`` is not callable, or the tree's adapters are malformed.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, jlora
    >>> model = nn.Dense(3)
    >>> x = jnp.ones((2, 4))
    >>> params = model.init(jax.random.key(0), x)
    >>> lorified = jlora.lorify(params, 2, key=jax.random.key(1))
    >>> y = jlora.lora(model.apply)(lorified, x)
    >>> bool(jnp.allclose(y, model.apply(params, x)))  # B = 0 at init
    True
  """
  from jlora._errors import Problems
  problems = Problems("jlora: cannot wrap the function with lora")
  if not callable(fn):
    problems.add(f"fn must be callable (e.g. model.apply), got {fn!r}")
  if rng is not None and not (isinstance(rng, jax.Array) and (
      jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key) or rng.shape == (2,))):
    problems.add(f"rng must be None or a PRNG key such as jax.random.key(0), got {rng!r}")
  if not isinstance(fuse, bool):
    problems.add(f"fuse must be True or False, got {fuse!r}")
  problems.raise_if_any()

  @functools.wraps(fn)
  def wrapped(params, *args, **kwargs):
    base, entries, _ = _structure.read(params, what="the tree passed to lora(fn)")
    base_leaves_kp, base_def = jax.tree_util.tree_flatten_with_path(
        base, is_leaf=is_quantized)
    base_leaves = [v for _, v in base_leaves_kp]
    # Only the tree's arrays are traced; its other leaves (an equinox
    # Module's activation functions, a flag) pass through as they are.
    base_dynamic = [is_array(v) or _is_dynamic(v) for v in base_leaves]
    # A quantized weight is traced as its logical float array, and enters
    # the interpreter still quantized (dequantized at each use).
    traced = [v.shape_dtype() if is_quantized(v) else v
              for v, d in zip(base_leaves, base_dynamic) if d]
    paths = [keypath_to_path(kp) for kp, _ in base_leaves_kp]
    arg_leaves, arg_def = jax.tree_util.tree_flatten((args, kwargs))
    dynamic = [_is_dynamic(a) for a in arg_leaves]
    dyn_vals = [a for a, d in zip(arg_leaves, dynamic) if d]

    def flat_fn(base_vals, dyn_vals):
      it = iter(dyn_vals)
      leaves = [next(it) if d else a for a, d in zip(arg_leaves, dynamic)]
      a, kw = jax.tree_util.tree_unflatten(arg_def, leaves)
      it = iter(base_vals)
      tree = [next(it) if d else v for v, d in zip(base_leaves, base_dynamic)]
      return fn(jax.tree_util.tree_unflatten(base_def, tree), *a, **kw)

    closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(traced, dyn_vals)
    invals = [_adapted.enter(v, entries[p]) if p in entries else _lazy.enter(v)
              for p, v, d in zip(paths, base_leaves, base_dynamic) if d]
    ctx = Context(rng=rng, fuse=fuse)
    outs = dense(ctx, evaluate(ctx, closed.jaxpr, closed.consts, [*invals, *dyn_vals]),
                 "output")
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)

  return wrapped
