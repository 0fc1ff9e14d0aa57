"""`lora(fn)`: running unmodified model code with adapters in factored form."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax

from jlora import _adapted, _structure
from jlora._runtime.context import Context
from jlora._runtime.interpret import evaluate
from jlora._runtime.registry import dense
from jlora._runtime.trace import trace
from jlora.quant import _lazy


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
    t = trace(fn, base, args, kwargs)
    # Quantized weights enter the interpreter still quantized (dequantized at
    # each use).
    invals = [_adapted.enter(v, entries[p]) if p in entries else _lazy.enter(v)
              for p, v in zip(t.paths, t.leaves)]
    ctx = Context(rng=rng, fuse=fuse)
    outs = dense(ctx, evaluate(ctx, t.jaxpr.jaxpr, t.jaxpr.consts, [*invals, *t.args]),
                 "output")
    return jax.tree_util.tree_unflatten(t.out_tree, outs)

  return wrapped
