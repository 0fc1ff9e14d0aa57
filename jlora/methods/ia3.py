"""(IA)³ (Liu et al., 2022): a learned vector rescaling one weight, and `ia3`."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora import _add, _targets
from jlora._errors import Problems
from jlora._targets import Axes, Targets
from jlora._tree import Path, path_str
from jlora.methods.base import DEFAULT_NAME, Method, WeightLabels
from jlora.methods.scaling import scale_weight, scaled_conv, scaled_dot, scaled_gather


@dataclasses.dataclass(frozen=True)
class IA3(Method):
  """(IA)³ (Liu et al., 2022): a learned vector ``l`` rescaling one weight.

  On the output side (keys, values, attention outputs) ``y = (x·W) ⊙ l``;
  with ``feedforward=True`` on the input side ``y = (x ⊙ l)·W`` (PEFT's
  ``feedforward_modules``). ``l`` starts at one, so the model starts out
  unchanged; merging scales W's output columns (or input rows) by ``l``.

  Unlike PEFT, which rescales the whole layer output including its bias,
  jlora scales ``x·W`` only (the method sees the weight, not the bias); the
  two agree at init and differ by ``(l − 1)·bias`` after training.

  Attributes:
    weight, stack, inputs, order, name: as in `LoRA`.
    feedforward: scale the input axes instead of the output axes.
  """

  feedforward: bool = False

  prefix = "ia3"
  leaves = ("l",)

  def describe(self) -> str:
    return f"IA3({'input' if self.feedforward else 'output'} side)"

  def shapes(self, weight_shape):
    s, i, o = self.split_shape(weight_shape)
    return (s + (i if self.feedforward else o),)

  def create(self, key, weight, *, dtype):
    return (jnp.ones(self.shapes(weight.shape)[0], dtype),), weight

  def labels(self, weight: WeightLabels, tag: str):
    return (weight.stack + (weight.inputs if self.feedforward else weight.outputs),)

  def fold(self, w, w_labels, arrays, labels):
    return scale_weight(w, w_labels, arrays[0], labels[0])

  def dot(self, use, arrays, labels, inner):
    return scaled_dot(use, arrays[0], labels[0], inner)

  def conv(self, use, arrays, labels, inner):
    return scaled_conv(use, arrays[0], labels[0], inner)

  def gather(self, use, arrays, labels, inner):
    return scaled_gather(use, arrays[0], labels[0], inner)

  # -- PEFT: IA3Config; ia3_l (out, 1), or (1, in) for feedforward_modules --
  peft_type = "IA3"

  @classmethod
  def peft_reads(cls, config):
    return config.get("peft_type") == "IA3"

  def peft_tensors(self, arrays, *, embedding):
    if embedding:
      raise ValueError("PEFT's IA3 has no embedding layer; export IA3 on linear layers only")
    l = np.asarray(arrays[0])
    return {"ia3_l": l.reshape((1, -1) if self.feedforward else (-1, 1))}

  @classmethod
  def peft_config(cls, methods):
    from jlora.peft._config import is_feedforward  # jlora.peft imports the methods

    config = {"peft_type": "IA3", "target_modules": sorted(methods),
              "feedforward_modules": sorted(k for k, m in methods.items() if m.feedforward),
              "init_ia3_weights": True}
    wrong = [k for k, m in methods.items() if is_feedforward(config, k) != m.feedforward]
    if wrong:
      raise ValueError(f"PEFT would scale {sorted(wrong)} on the wrong side (it matches "
                       "feedforward_modules by name suffix, and the torch names clash); "
                       "map the modules to their full, distinct torch names")
    return config

  @classmethod
  def from_peft(cls, config, module, tensors, *, shape, embedding, name):
    from jlora.peft._config import is_feedforward

    l = tensors.pop("ia3_l", None)
    if l is None:
      raise ValueError(f"ia3_l missing for {module}; the file is incomplete")
    feedforward = is_feedforward(config, module)
    want = (1, shape[0]) if feedforward else (shape[1], 1)
    if l.shape != want:
      side = "a feedforward (input-side)" if feedforward else "an output-side"
      raise ValueError(f"ia3_l {l.shape} does not fit {module} as {side} module (expected "
                       f"{want}); the adapter belongs to another model, or "
                       "feedforward_modules does not match")
    return cls(feedforward=feedforward, name=name), (l.reshape(-1),)

  @classmethod
  def peft_fuse(cls, parts):
    present = [m for m, *_ in parts if m is not None]
    if len({m.feedforward for m in present}) > 1:
      raise ValueError("the parts are scaled on different sides; one fused module has one")
    if present[0].feedforward:  # one input vector: the parts must share it
      ls = [None if a is None else np.asarray(a[0]) for _, a, _, _ in parts]
      if any(l is None for l in ls) or any((l != ls[0]).any() for l in ls):
        raise ValueError("input-side IA3 on a fused module scales one input for all "
                         "parts; the parts' vectors differ (or a part has none)")
      return present[0], (ls[0],)
    dtype = next(np.asarray(a[0]).dtype for m, a, _, _ in parts if m is not None)
    l = np.concatenate([np.ones(n, dtype) if m is None else np.asarray(a[0])
                        for m, a, n, _ in parts])
    return present[0], (l,)

  def peft_split(self, arrays, sizes):
    l = arrays[0]
    if self.feedforward:
      return [(self, (l,)) for _ in sizes]
    cuts = np.cumsum((0,) + tuple(sizes))
    return [(self, (l[lo:hi],)) for lo, hi in zip(cuts[:-1], cuts[1:])]


def _matches(feedforward: Targets, path: Path, leaf) -> bool:
  if feedforward is None:
    return False
  if isinstance(feedforward, str):
    feedforward = (feedforward,)
  if hasattr(feedforward, "search"):
    return bool(feedforward.search(path_str(path)))
  if callable(feedforward):
    return bool(feedforward(path_str(path), leaf))
  return len(path) >= 2 and path[-2] in tuple(feedforward)


def ia3(params: Any, *, targets: Targets, feedforward: Targets = (),
        axes: Axes | dict | None = None, trainable: Targets = None,
        name: str = DEFAULT_NAME, dtype=None) -> Any:
  """Adds (IA)³ scaling vectors to the chosen weights (PEFT's ``IA3Config``).

  Every weight that ``targets`` picks gets a vector ``ia3_l`` of ones:
  over its output axes (``y = (x·W) ⊙ l``), or, for the weights that
  ``feedforward`` also picks, over its input axes (``y = (x ⊙ l)·W``). As in
  PEFT, ``feedforward`` must be a subset of ``targets``. PEFT's default for
  BERT is keys, values and the feed-forward down projection, the latter
  scaled on its input.

  Args:
    params: a tree of arrays (may already hold other methods' adapters).
    targets: the weights to adapt, in any form `lorify` accepts.
    feedforward: the targets scaled on the input side: names, a regex or a
      predicate, as ``targets``.
    axes: `Axes` or ``{regex: Axes}`` for stacked or multi-axis weights.
    trainable: leaves to train in full, as in `lorify`.
    name: the adapter's name (``ia3@name`` keys unless ``"default"``).
    dtype: dtype of the vectors (default: the weight's).

  Returns:
    The tree with the vectors added.

  Raises:
    LoraError: listing every problem (targets matching nothing, feedforward
      modules outside targets, a weight that already has (IA)³ vectors).

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"k": {"kernel": jnp.ones((4, 6))}, "ff": {"kernel": jnp.ones((6, 4))}}
    >>> p = jlora.ia3(params, targets=("k", "ff"), feedforward=("ff",))
    >>> p["k"]["ia3_l"].shape, p["ff"]["ia3_l"].shape
    ((6,), (6,))
    >>> bool(jnp.all(jlora.merge(p)["k"]["kernel"] == params["k"]["kernel"]))
    True
  """
  pre = Problems("jlora: cannot add IA3 vectors")
  _add.check_name(name, pre)
  _targets.check_axes(axes, pre)
  if isinstance(feedforward, (list, tuple)) and isinstance(targets, (list, tuple)):
    extra = [f for f in feedforward if f not in targets]
    if extra:
      pre.add(f"feedforward modules {extra} are not in targets {list(targets)}; "
              "as in PEFT, feedforward_modules must be a subset of target_modules")
  pre.raise_if_any()

  def make(path: Path, leaf) -> IA3:
    stack, inputs, layout = _targets.placement(path, leaf, axes)
    return IA3(weight=path[-1], stack=stack, inputs=inputs, layout=layout,
               feedforward=_matches(feedforward, path, leaf), name=name)

  return _add.add_adapters(params, make, key=jax.random.key(0), targets=targets,
                           trainable=trainable, dtype=dtype, what="IA3 vectors",
                           problems=pre)
